"""Static-camera test clips composed from real photographs.

Both real videos we have are hand-held (every token changes every frame). Fixed cameras (the main use
of many-stream serving) change locally: objects move over a still background, with sensor noise,
exposure drift and codec artefacts everywhere. This composes such a clip from real images so the
benchmark can show both regimes. It is synthetic motion over real pixels: say so when reporting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class StaticClipSpec:
    width: int = 640
    height: int = 360
    frames: int = 150
    fps: int = 25
    noise_std: float = 3.0  # sensor noise, in 8-bit levels
    exposure_drift: float = 0.02  # relative amplitude of a slow global brightness change
    crf: int = 26  # H.264 quality (higher: more codec artefacts)
    seed: int = 1


def _load_rgb(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    # size: (width, height) -> float32 [H, W, 3]
    return np.asarray(Image.open(path).convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)


def make_static_clip(
    out_path: str | Path, background: str | Path, sprites: list[str | Path], spec: StaticClipSpec | None = None
) -> Path:
    """Write an H.264 clip: `background` fixed, each sprite image sliding and bobbing across it."""
    spec = spec or StaticClipSpec()
    rng = np.random.default_rng(spec.seed)
    w, h = spec.width, spec.height
    with Image.open(background) as image:
        scaled_height = max(h, round(w * image.height / image.width))  # fill the width, crop the middle rows
    bg_full = _load_rgb(background, (w, scaled_height))
    top = (bg_full.shape[0] - h) // 2
    bg = bg_full[top : top + h]
    sprite_sizes = [(w // 5, h // 4 - 10), (w // 8, h // 7)]
    movers = []
    for i, path in enumerate(sprites):
        sw, sh = sprite_sizes[i % len(sprite_sizes)]
        movers.append((_load_rgb(path, (sw, sh)), rng.uniform(1.5, 3.5) * (-1) ** i, rng.uniform(0.1, 0.8)))

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out_path), "w") as container:
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(spec.crf)}
        for t in range(spec.frames):
            frame = bg.copy()
            for k, (sprite, speed, row) in enumerate(movers):
                sh, sw = sprite.shape[:2]
                x = int(w / 3 + speed * t) % (w - sw)
                y = int(row * (h - sh) + 0.08 * h * np.sin(t / (8 + 3 * k)))
                y = min(max(y, 0), h - sh)
                frame[y : y + sh, x : x + sw] = sprite
            frame *= 1 + spec.exposure_drift * np.sin(t / 12)
            frame += rng.normal(0, spec.noise_std, frame.shape)
            image = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out_path
