"""Preprocessing: input kinds agree, and the torch pipeline matches PIL-based timm / Hugging Face preprocessing."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from model.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from model.preprocess import Preprocessor, read_video_frames

DEIT = PreprocessConfig()  # timm DeiT: resize short side 256 bicubic, centre crop 224, ImageNet mean/std
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def natural_frame(h: int = 300, w: int = 451, seed: int = 0) -> np.ndarray:
    """Smooth blobs plus sharp edges: a stand-in for a photo (RGB uint8 [h, w, 3])."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 20, w // 20, 3), dtype=np.uint8))
    frame = np.asarray(coarse.resize((w, h), Image.BICUBIC)).copy()
    frame[h // 3 : h // 2, w // 4 :] = (250, 20, 20)
    return frame


def pil_timm_pipeline(frame: np.ndarray, short: int = 256, crop: int = 224) -> torch.Tensor:
    """torchvision Resize(short, BICUBIC) on a PIL image + CenterCrop + Normalize, written out with Pillow."""
    image = Image.fromarray(frame)
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    image = image.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    return (x - MEAN) / STD


def test_shape_and_normalisation():
    grey = np.full((300, 451, 3), 128, np.uint8)
    out = Preprocessor(DEIT)([grey, grey])
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    expected = ((128 / 255 - MEAN) / STD).expand(3, 224, 224)
    assert torch.allclose(out[0], expected, atol=1e-6) and torch.equal(out[0], out[1])


def test_output_size_follows_config():
    frame = natural_frame(120, 200)
    exact = PreprocessConfig(resize_shortest=None, resize_to=(48, 64), crop_size=None)
    assert Preprocessor(exact)(frame).shape[-2:] == (48, 64)
    no_crop = PreprocessConfig(resize_shortest=96, crop_size=None)
    assert Preprocessor(no_crop)(frame).shape[-2:] == no_crop.output_size((120, 200)) == (96, 160)
    keep = PreprocessConfig(resize_shortest=None, crop_size=None)
    unchanged = torch.from_numpy(frame).permute(2, 0, 1) / 255
    assert torch.allclose(Preprocessor(keep)(frame)[0] * STD + MEAN, unchanged, atol=1e-6)


def test_input_kinds_agree():
    frames = [natural_frame(seed=s) for s in range(3)]
    preprocess = Preprocessor(DEIT)
    from_numpy = preprocess(frames)
    from_torch = preprocess([torch.from_numpy(f) for f in frames])
    from_av = preprocess([av.VideoFrame.from_ndarray(f, format="rgb24") for f in frames])
    from_batch = preprocess(np.stack(frames))
    assert torch.equal(from_numpy, from_torch) and torch.equal(from_numpy, from_av)
    assert torch.equal(from_numpy, from_batch)
    assert torch.equal(preprocess(frames[1]), from_numpy[1:2])
    assert preprocess(frames, device="cpu").device.type == "cpu"


def test_frames_of_different_sizes_are_each_resized():
    frames = [natural_frame(300, 451), natural_frame(240, 320, seed=1), natural_frame(300, 451, seed=2)]
    preprocess = Preprocessor(DEIT)
    batch = preprocess(frames)
    assert batch.shape == (3, 3, 224, 224)
    for i, frame in enumerate(frames):
        assert torch.equal(batch[i], preprocess(frame)[0])


@pytest.mark.parametrize("h, w", [(300, 451), (480, 360), (200, 200), (180, 240)])
def test_bicubic_resize_crop_matches_pillow(h, w):
    """On CPU the uint8 antialiased bicubic is Pillow's fixed-point filter: rarely off, by at most two 8-bit levels."""
    frame = natural_frame(h, w)
    diff = (Preprocessor(DEIT)(frame)[0] - pil_timm_pipeline(frame)).abs()  # normalised units: 1 level ~ 0.0175
    assert diff.mean() < 0.001 and diff.max() < 0.04


def test_real_image_matches_pillow(shared_file):
    frame = np.asarray(Image.open(shared_file("data/images/chelsea.png")).convert("RGB"))
    assert (Preprocessor(DEIT)(frame)[0] - pil_timm_pipeline(frame)).abs().mean() < 0.002


def test_matches_transformers_pil_image_processor():
    """The config read from a facebook/deit-*-224 preprocessor file reproduces HF's own (Pillow) processor."""
    transformers = pytest.importorskip("transformers")
    from model.loaders import config_from_hf

    hf_pre = {
        "feature_extractor_type": "DeiTFeatureExtractor", "size": 256, "crop_size": 224, "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "resample": 3,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    }  # fmt: skip
    ours = Preprocessor(config_from_hf({"model_type": "deit"}, hf_pre).preprocess)
    theirs = transformers.DeiTImageProcessorPil(**{k: v for k, v in hf_pre.items() if k != "feature_extractor_type"})
    frame = natural_frame(300, 451)
    reference = theirs(Image.fromarray(frame), return_tensors="pt")["pixel_values"]
    assert reference.shape == (1, 3, 224, 224)
    assert (ours(frame) - reference).abs().mean() < 0.02


def test_nearest_matches_pillow_exactly():
    frame = natural_frame(97, 131)
    config = PreprocessConfig(resize_shortest=None, resize_to=(50, 40), crop_size=None, interpolation="nearest")
    ours = Preprocessor(config)(frame)[0] * STD + MEAN
    pil = torch.from_numpy(np.asarray(Image.fromarray(frame).resize((40, 50), Image.NEAREST)).copy())
    assert torch.allclose(ours * 255, pil.permute(2, 0, 1).float(), atol=1e-3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (torch.zeros(8, 8, 3, dtype=torch.int32), "uint8"),
        (np.zeros((8, 8, 4), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((8, 8), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        ([], "no frames"),
        ("frame.png", "expected RGB uint8"),
    ],
)
def test_bad_input_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        Preprocessor(DEIT)(bad)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessor(PreprocessConfig(interpolation="lanczos"))
    with pytest.raises(ValueError, match="larger than the resized frame"):
        Preprocessor(PreprocessConfig(resize_shortest=None, crop_size=(64, 64)))(np.zeros((32, 48, 3), np.uint8))


def write_clip(path, frames: int = 8, h: int = 48, w: int = 64) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 30 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_read_video_frames(tmp_path):
    write_clip(tmp_path / "clip.mp4")
    frames = read_video_frames(tmp_path / "clip.mp4")
    assert len(frames) == 8 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert [round(f.mean() / 30) for f in frames] == list(range(8))  # decoded in order (lossy, so roughly)
    window = read_video_frames(tmp_path / "clip.mp4", max_frames=3, start=2)
    assert len(window) == 3 and all(np.array_equal(a, b) for a, b in zip(window, frames[2:5], strict=True))
    assert read_video_frames(tmp_path / "clip.mp4", max_frames=0) == []


def test_read_video_frames_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_video_frames(tmp_path / "missing.mp4")
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match="cannot decode video"):
        read_video_frames(tmp_path / "garbage.mp4")


def test_read_real_video(shared_file):
    frames = read_video_frames(shared_file("data/videos/realshort.mp4"))
    assert len(frames) == 36 and frames[0].shape == (240, 320, 3)
    assert Preprocessor(DEIT)(frames[:4]).shape == (4, 3, 224, 224)
