"""Architecture and preprocessing configs for plain vision transformers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded RGB frame becomes a normalised input tensor.

    resize_shortest: resize so the short side has this length (keeps aspect), or
    resize_to: resize to exactly (height, width); then an optional centre crop.
    """

    resize_shortest: int | None = 256
    resize_to: tuple[int, int] | None = None
    crop_size: tuple[int, int] | None = (224, 224)
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def output_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """Size (height, width) of the tensor produced from a frame of this size."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_to is not None:
            return self.resize_to
        h, w = frame_hw
        if self.resize_shortest is None:
            return h, w
        scale = self.resize_shortest / min(h, w)
        return round(h * scale), round(w * scale)


@dataclass(frozen=True)
class ViTConfig:
    """A plain ViT/DeiT classifier: patch embedding, prefix tokens, blocks, head."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    class_token: bool = True
    distill_token: bool = False
    num_classes: int = 1000
    label_names: tuple[str, ...] | None = field(default=None, compare=False, repr=False)
    preprocess: PreprocessConfig = PreprocessConfig()

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def with_image_size(self, image_size: tuple[int, int]) -> ViTConfig:
        """Same weights, another input size (position embeddings get resampled)."""
        h, w = image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {self.patch_size}")
        return replace(self, image_size=(h, w))

    @classmethod
    def from_name(cls, name: str, **overrides) -> ViTConfig:
        """A named architecture (random weights unless loaded), e.g. 'vit-base-patch16-224'."""
        key = name.lower().removeprefix("google/").removeprefix("facebook/")
        if key not in NAMED_CONFIGS:
            raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
        return replace(NAMED_CONFIGS[key], **overrides)


def _vit(dim: int, depth: int, heads: int, patch: int = 16, size: int = 224, **kw) -> ViTConfig:
    return ViTConfig(
        image_size=(size, size), patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=4 * dim, **kw
    )


# timm-style DeiT preprocessing: resize 256 bicubic, centre crop 224, ImageNet mean/std.
_DEIT_PRE = PreprocessConfig()
# google/vit-*-224: resize to 224x224 bilinear, mean/std 0.5.
_GOOGLE_PRE = PreprocessConfig(
    resize_shortest=None, resize_to=(224, 224), crop_size=None, interpolation="bilinear",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)

NAMED_CONFIGS: dict[str, ViTConfig] = {
    "vit-tiny-patch16-224": _vit(192, 12, 3, preprocess=_GOOGLE_PRE),
    "vit-small-patch16-224": _vit(384, 12, 6, preprocess=_GOOGLE_PRE),
    "vit-base-patch16-224": _vit(768, 12, 12, preprocess=_GOOGLE_PRE),
    "vit-large-patch16-224": _vit(1024, 24, 16, preprocess=_GOOGLE_PRE),
    "deit-tiny-patch16-224": _vit(192, 12, 3, preprocess=_DEIT_PRE),
    "deit-small-patch16-224": _vit(384, 12, 6, preprocess=_DEIT_PRE),
    "deit-base-patch16-224": _vit(768, 12, 12, preprocess=_DEIT_PRE),
    "deit-tiny-distilled-patch16-224": _vit(192, 12, 3, distill_token=True, preprocess=_DEIT_PRE),
    "deit-small-distilled-patch16-224": _vit(384, 12, 6, distill_token=True, preprocess=_DEIT_PRE),
    "deit-base-distilled-patch16-224": _vit(768, 12, 12, distill_token=True, preprocess=_DEIT_PRE),
}


# --------------------------------------------------------------------------- detection (YOLOS) and clips (VideoMAE)


@dataclass(frozen=True)
class DetectorConfig(ViTConfig):
    """YOLOS: a DeiT/ViT backbone with learned detection tokens and class / box MLP heads.

    Token order inside our model is [cls, det_1..det_D, patches] (Hugging Face: [cls, patches, det]); attention
    is permutation-equivariant, so the detection tokens are prefix tokens that pass every eventful gate.
    num_classes counts object classes without "no object" (the class head has num_classes + 1 outputs).
    """

    num_detection_tokens: int = 100
    mid_position_embeddings: bool = False  # a position embedding added after every block but the last

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_detection_tokens


@dataclass(frozen=True)
class VideoConfig(ViTConfig):
    """VideoMAE: tubelet (tubelet_size x patch x patch) Conv3d embedding, fixed sinusoidal positions, no class token;
    mean pooling + fc_norm (LayerNorm eps 1e-5, as transformers) + head, or the first token through norm.

    num_patches / num_tokens count the whole clip: (num_frames // tubelet_size) * grid cells.
    """

    num_frames: int = 16
    tubelet_size: int = 2
    use_mean_pooling: bool = True
    fc_norm_eps: float = 1e-5
    run_length_embedding: bool = False  # RLT's learned run-length embedding (only with weights for it)
    class_token: bool = False

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def num_tubelets(self) -> int:
        return self.num_frames // self.tubelet_size

    @property
    def tokens_per_tubelet(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_patches(self) -> int:
        return self.num_tubelets * self.tokens_per_tubelet


COCO_LABELS: tuple[str, ...] = (
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop",
    "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip  # id2label of the hustvl/yolos-* checkpoints (COCO category ids 0..90)

# YolosImageProcessor: bilinear, ImageNet mean/std; frames are resized whole to the model's input size.
_YOLOS_PRE = PreprocessConfig(resize_shortest=None, resize_to=(512, 864), crop_size=None, interpolation="bilinear")
# VideoMAEImageProcessor: short side 224 bilinear, centre crop 224, ImageNet mean/std.
_VIDEOMAE_PRE = PreprocessConfig(resize_shortest=224, crop_size=(224, 224), interpolation="bilinear")


def _yolos(dim: int, depth: int, heads: int, mid: bool) -> DetectorConfig:
    return DetectorConfig(
        image_size=(512, 864), patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=4 * dim,
        layer_norm_eps=1e-12, num_classes=len(COCO_LABELS), label_names=COCO_LABELS, preprocess=_YOLOS_PRE,
        num_detection_tokens=100, mid_position_embeddings=mid,
    )  # fmt: skip


def _videomae(dim: int, depth: int, heads: int) -> VideoConfig:
    return VideoConfig(
        image_size=(224, 224), patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_dim=4 * dim,
        layer_norm_eps=1e-12, num_classes=400, preprocess=_VIDEOMAE_PRE, num_frames=16, tubelet_size=2,
    )  # fmt: skip


NAMED_CONFIGS.update(
    {
        "yolos-tiny": _yolos(192, 12, 3, mid=False),  # hustvl/yolos-tiny (input 512x864 here; HF: 800x1333)
        "yolos-small": _yolos(384, 12, 6, mid=True),  # hustvl/yolos-small
        "videomae-small": _videomae(384, 12, 6),  # MCG-NJU/videomae-small-finetuned-kinetics
        "videomae-base": _videomae(768, 12, 12),  # MCG-NJU/videomae-base-finetuned-kinetics
    }
)


# --------------------------------------------------------------------------- windowed-attention backbones (ViTDet)


@dataclass(frozen=True)
class ViTDetConfig(ViTConfig):
    """ViTDet (Li et al., ECCV 2022): a plain ViT backbone for detection at high resolution. No class token, no
    head: the output is the final feature map [B, C, H/p, W/p]. Blocks in window_block_indices (transformers'
    VitDetConfig convention) attend within non-overlapping window_size x window_size windows of the grid padded to
    whole windows (padding tokens are zeros after norm1, as transformers); the others attend globally. Relative
    position terms (rel_pos_h / rel_pos_w) are decomposed per axis, as in MViTv2."""

    class_token: bool = False
    num_classes: int = 0
    window_size: int = 14
    window_block_indices: tuple[int, ...] = ()
    use_relative_position_embeddings: bool = True
    use_absolute_position_embeddings: bool = True

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def is_windowed(self, block: int) -> bool:
        return self.window_size > 0 and block in self.window_block_indices

    @property
    def window_grid(self) -> tuple[int, int]:
        """Windows along (height, width) once the grid is padded to whole windows."""
        gh, gw = self.grid_size
        return -(-gh // self.window_size), -(-gw // self.window_size)

    @property
    def window_tokens(self) -> int:
        return self.window_size**2

    @property
    def padded_tokens(self) -> int:
        """Tokens of the grid padded to whole windows (the window-major layout of a windowed block's keys)."""
        nh, nw = self.window_grid
        return nh * nw * self.window_tokens


# detectron2's ViTDet: longest side resized to 1024 and padded; here whole frames resized to the input size.
_VITDET_PRE = PreprocessConfig(resize_shortest=None, resize_to=(1024, 1024), crop_size=None, interpolation="bilinear")

NAMED_CONFIGS["vitdet-base-patch16-1024"] = ViTDetConfig(
    image_size=(1024, 1024), patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072,
    window_size=14, window_block_indices=(0, 1, 3, 4, 6, 7, 9, 10), preprocess=_VITDET_PRE,
)  # fmt: skip  # ViTDet-B (detectron2 mask_rcnn_vitdet_b): global attention in blocks 2, 5, 8, 11


# --------------------------------------------------------------------------- open-vocabulary detection (OWLv2)

# OpenAI CLIP normalisation (Owlv2ImageProcessor); frames are padded to a square, then resized whole.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Owlv2Config(ViTConfig):
    """OWLv2 (Minderer et al., NeurIPS 2023): a CLIP vision encoder (pre-LayerNorm, quick_gelu MLPs, no bias on the
    patch embedding) whose every patch token gets a box, an objectness and a class embedding compared with
    text-query embeddings of a CLIP text encoder. The ViT fields describe the vision encoder; its class token is
    the one prefix token (multiplied into every patch token by the image-feature path). num_classes is 0: the
    classes are the queries, given at run time."""

    layer_norm_eps: float = 1e-5
    num_classes: int = 0
    text_embed_dim: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp_dim: int = 2048
    vocab_size: int = 49408
    max_text_tokens: int = 16  # positions of the text encoder: a query's tokens, BOS and EOS included
    projection_dim: int = 512  # text projection (= text_embed_dim in every released OWLv2)
    text_layer_norm_eps: float = 1e-5

    @property
    def text_config(self) -> ViTConfig:
        """The text encoder's blocks as a ViTConfig (width, heads, MLP width, LayerNorm eps)."""
        return ViTConfig(embed_dim=self.text_embed_dim, depth=self.text_depth, num_heads=self.text_heads,
                         mlp_dim=self.text_mlp_dim, layer_norm_eps=self.text_layer_norm_eps, num_classes=0)


# Owlv2ImageProcessor: pad to a square (bottom/right, black), resize to 960 x 960 bilinear, CLIP mean/std.
_OWLV2_PRE = PreprocessConfig(resize_shortest=None, resize_to=(960, 960), crop_size=None, interpolation="bilinear",
                              mean=CLIP_MEAN, std=CLIP_STD)

NAMED_CONFIGS["owlv2-base-patch16"] = Owlv2Config(
    image_size=(960, 960), patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, preprocess=_OWLV2_PRE,
)  # fmt: skip  # OWLv2-B/16 (google/owlv2-base-patch16-ensemble): 60 x 60 = 3,600 patches + class; CLIP-B text
