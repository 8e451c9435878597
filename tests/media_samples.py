"""Deterministic sample media written on the fly (no binary fixtures in the repo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def sample_image(path: Path, width: int, height: int, seed: int) -> str:
    """A smooth gradient plus noise: structured enough to exercise every patch."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def sample_video(path: Path, n_frames: int, size: tuple[int, int], fps: int = 4) -> str:
    """An mpeg4 clip of a square moving across a gradient."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None]
            x0 = (i * 7) % max(1, width - 16)
            frame[10:26, x0 : x0 + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
