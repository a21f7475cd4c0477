"""Decoded RGB frames -> normalised model input, matching the PIL-based timm / Hugging Face pipelines closely."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from model.config import PreprocessConfig

# PIL's NEAREST samples at pixel centres, which is torch's "nearest-exact" (torch's "nearest" floors).
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}

Frame = np.ndarray | torch.Tensor | av.VideoFrame


class Preprocessor:
    """Resize, centre crop, scale to [0, 1] and normalise RGB uint8 frames into a [B, 3, H, W] float32 batch.

    Bicubic/bilinear resizing uses torch's antialiased kernels in both directions: that is PIL's filter
    (bicubic a = -0.5, support widened when downscaling), so the output matches PIL-based preprocessing to
    within rounding. Resized pixels are clamped and rounded to 0..255 like PIL's uint8 output.
    The short-side resize before a crop truncates the long side, like torchvision ``Resize(int)`` and HF
    ``shortest_edge``; without a crop the output size is ``config.output_size(frame_hw)``.
    """

    def __init__(self, config: PreprocessConfig, device: torch.device | str | None = None):
        if config.interpolation not in _TORCH_MODES:
            raise ValueError(f"unknown interpolation {config.interpolation!r}; expected one of {sorted(_TORCH_MODES)}")
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)

    def resized_size(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        """Size (height, width) of a frame after the resize step, before any crop."""
        cfg, (h, w) = self.config, frame_hw
        if cfg.resize_to is not None:
            return tuple(cfg.resize_to)
        if cfg.resize_shortest is None:
            return h, w
        if cfg.crop_size is None:
            return cfg.output_size((h, w))
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(cfg.resize_shortest * long / short)
        return (cfg.resize_shortest, new_long) if h <= w else (new_long, cfg.resize_shortest)

    def __call__(self, frames: Frame | Sequence[Frame], device: torch.device | str | None = None) -> torch.Tensor:
        """frames: one or a list of RGB uint8 [H, W, 3] arrays/tensors or av.VideoFrames -> [B, 3, H', W']."""
        device = torch.device(device) if device is not None else self.device
        images = [_to_uint8_chw(f, i).to(device, non_blocking=True) for i, f in enumerate(_as_list(frames))]
        # Frames of one size are resized together; the batch keeps the input order.
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for hw, idx in by_size.items():
            batch = self._transform(torch.stack([images[i] for i in idx]), hw)  # [b, 3, H', W']
            for j, i in enumerate(idx):
                out[i] = batch[j]
        return torch.stack(out)

    def _transform(self, images: torch.Tensor, frame_hw: tuple[int, int]) -> torch.Tensor:
        # images: [b, 3, H, W] uint8 -> [b, 3, H', W'] float32 normalised
        cfg = self.config
        size = self.resized_size(frame_hw)
        if size != frame_hw:
            mode = _TORCH_MODES[cfg.interpolation]
            if mode == "nearest-exact":
                x = F.interpolate(images.float(), size=size, mode=mode)
            elif images.device.type == "cpu":
                # uint8 in, uint8 out: torch's fixed-point antialiased kernels, Pillow's algorithm (~5x faster on
                # CPU than resampling in float, and as close to Pillow)
                channels_last = images.contiguous(memory_format=torch.channels_last)
                x = F.interpolate(channels_last, size=size, mode=mode, align_corners=False, antialias=True).float()
            else:
                x = F.interpolate(images.float(), size=size, mode=mode, align_corners=False, antialias=True)
                x = x.clamp_(0, 255).round_()
        else:
            x = images.float()
        if cfg.crop_size is not None:
            x = _center_crop(x, cfg.crop_size)
        mean, std = self._mean.to(x.device), self._std.to(x.device)
        return (x / 255.0 - mean) / std


def _center_crop(x: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    # x: [b, 3, H, W] -> [b, 3, ch, cw]; offsets rounded like torchvision's center_crop
    (h, w), (ch, cw) = x.shape[-2:], crop_hw
    if ch > h or cw > w:
        raise ValueError(f"crop {crop_hw} is larger than the resized frame {(h, w)}")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


def _as_list(frames: Frame | Sequence[Frame]) -> list[Frame]:
    if isinstance(frames, np.ndarray | torch.Tensor) and frames.ndim == 4:
        return list(frames)  # a [B, H, W, 3] batch
    if isinstance(frames, np.ndarray | torch.Tensor | av.VideoFrame):
        return [frames]
    if isinstance(frames, Sequence) and not isinstance(frames, str | bytes):
        if not frames:
            raise ValueError("no frames given")
        return list(frames)
    raise ValueError(f"expected RGB uint8 [H, W, 3] frames (numpy, torch or av.VideoFrame), got {type(frames)!r}")


def _to_uint8_chw(frame: Frame, index: int) -> torch.Tensor:
    # frame: [H, W, 3] uint8 -> [3, H, W] uint8 tensor (no copy for contiguous numpy/torch inputs)
    if isinstance(frame, av.VideoFrame):
        frame = frame.to_ndarray(format="rgb24")
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8:
            raise ValueError(f"frame {index}: expected dtype uint8, got {frame.dtype}")
        if not (frame.flags.c_contiguous and frame.flags.writeable):
            frame = np.array(frame)  # torch wants a writable, contiguous buffer
        frame = torch.from_numpy(frame)
    elif not isinstance(frame, torch.Tensor):
        raise ValueError(f"frame {index}: expected numpy array, torch tensor or av.VideoFrame, got {type(frame)!r}")
    if frame.dtype != torch.uint8:
        raise ValueError(f"frame {index}: expected dtype uint8, got {frame.dtype}")
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame {index}: expected an RGB [H, W, 3] frame, got shape {tuple(frame.shape)}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame {index}: empty frame of shape {tuple(frame.shape)}")
    return frame.permute(2, 0, 1)


def read_video_frames(path: str | Path, max_frames: int | None = None, start: int = 0) -> list[np.ndarray]:
    """Decode frames start .. start+max_frames of a video's first video stream as RGB uint8 [H, W, 3] arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if start < 0 or (max_frames is not None and max_frames < 0):
        raise ValueError(f"start and max_frames must be >= 0, got start={start}, max_frames={max_frames}")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                if i >= start:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as err:
        raise ValueError(f"cannot decode video {path}: {err}") from err
    return frames
