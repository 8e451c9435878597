"""Video decoding (PyAV) and Qwen-style frame sampling.

Frame counts follow ``Qwen2VLVideoProcessor.sample_frames`` in transformers (the same count as
``qwen_vl_utils.smart_nframes``): ``fps`` frames per second of video, clamped to
``[min_frames, max_frames]`` and to the frames available, floored to a multiple of the temporal
patch size so frames pair up into temporal patches.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from shared.media.image import DEFAULT_TIMEOUT_S, ImageSource, load_image, read_source_bytes

if TYPE_CHECKING:
    import av

VideoSource = str | bytes | bytearray | Path

_REMOTE = ("http://", "https://", "data:")

DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768


@dataclass(frozen=True)
class VideoClip:
    """Sampled frames of one video.

    frames: (T, H, W, 3) uint8 RGB.
    fps: rate of the *sampled* frames (what ``seconds_per_grid`` is derived from).
    timestamps: presentation time in seconds of each sampled frame.
    """

    frames: np.ndarray
    fps: float
    timestamps: list[float]
    indices: list[int]
    source_fps: float
    total_frames: int


def num_sampled_frames(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = DEFAULT_FPS,
    num_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    temporal_patch_size: int = 2,
) -> int:
    """How many frames to keep (transformers' ``sample_frames`` arithmetic)."""
    if total_frames <= 0:
        raise ValueError("video has no frames")
    tps = temporal_patch_size
    if num_frames is not None:
        count = round(num_frames / tps) * tps
    elif fps is not None:
        cap = math.floor(min(max_frames, total_frames) / tps) * tps
        count = total_frames / video_fps * fps
        count = min(max(count, min_frames), cap, total_frames)
        count = math.floor(count / tps) * tps
    else:
        count = total_frames
    if count > total_frames:
        raise ValueError(f"cannot sample {count} frames from a video of {total_frames}")
    # transformers would divide by zero here; a 1-frame clip is still a valid (padded) video.
    return max(count, min(total_frames, tps))


def sample_frame_indices(total_frames: int, count: int) -> np.ndarray:
    """Uniform indices ``floor(i * total / count)``: transformers'
    ``arange(0, total, total / count)`` in exact integer arithmetic (the float version can
    return ``count + 1`` indices through rounding)."""
    return (np.arange(count, dtype=np.int64) * total_frames) // count


def _open(source: VideoSource, timeout: float) -> av.container.InputContainer:
    import av  # PyAV loads FFmpeg: only processes that decode video pay for it

    if isinstance(source, (str, Path)) and not str(source).startswith(_REMOTE):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"video file not found: {str(source)[:200]}")
        target: str | io.BytesIO = str(path)
    else:
        target = io.BytesIO(read_source_bytes(source, timeout))
    try:
        return av.open(target)
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"could not open video: {exc}") from exc


def _probe(source: VideoSource, timeout: float) -> tuple[int, float]:
    """(total frames, average fps) from metadata; counts packets when the container has no count."""
    with _open(source, timeout) as container:
        if not container.streams.video:
            raise ValueError("no video stream in input")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        total = stream.frames
        if total <= 0:  # e.g. webm/mkv: count packets (demux only, no decoding)
            total = sum(1 for packet in container.demux(stream) if packet.size)
        if not rate:
            if stream.duration is None or stream.time_base is None:
                raise ValueError("video has no frame rate or duration")
            rate = total / float(stream.duration * stream.time_base)
        return total, float(rate)


def _decode(
    source: VideoSource, wanted: np.ndarray, fps: float, timeout: float
) -> tuple[np.ndarray, list[float]]:
    """Decode once, keeping frames at ``wanted`` (sorted) indices. If the stream turns out shorter
    than its metadata said, missing indices reuse the last decoded frame."""
    import av

    wanted_set = set(wanted.tolist())
    kept: dict[int, tuple[np.ndarray, float]] = {}
    last: tuple[np.ndarray, float] | None = None
    last_index = int(wanted[-1])
    with _open(source, timeout) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted_set or i == last_index:
                    time = float(frame.time) if frame.time is not None else i / fps
                    last = (frame.to_ndarray(format="rgb24"), time)
                    kept[i] = last
                if i >= last_index:
                    break
        except av.FFmpegError as exc:
            if not kept:
                raise ValueError(f"could not decode video: {exc}") from exc
    if last is None:
        raise ValueError("could not decode any video frame")
    picked = [kept.get(i, last) for i in wanted.tolist()]
    return np.stack([p[0] for p in picked]), [p[1] for p in picked]


def load_video(
    source: VideoSource,
    *,
    fps: float | None = DEFAULT_FPS,
    num_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    temporal_patch_size: int = 2,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> VideoClip:
    """Decode ``source`` (path, bytes, http(s) or data URL) and sample frames Qwen-style."""
    if fps is not None and num_frames is not None:
        raise ValueError("pass either fps or num_frames, not both")
    if isinstance(source, (str, Path)) and str(source).startswith(_REMOTE):
        source = read_source_bytes(str(source), timeout)  # fetch once, decode twice
    total, video_fps = _probe(source, timeout)
    count = num_sampled_frames(
        total,
        video_fps,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        temporal_patch_size=temporal_patch_size,
    )
    indices = sample_frame_indices(total, count)
    frames, timestamps = _decode(source, indices, video_fps, timeout)
    return VideoClip(
        frames=frames,
        fps=count / total * video_fps,
        timestamps=timestamps,
        indices=indices.tolist(),
        source_fps=video_fps,
        total_frames=total,
    )


def stack_frames(images: Sequence[ImageSource]) -> np.ndarray:
    """A video given as a list of images: load each, resize to the first one's size, stack."""
    if not images:
        raise ValueError("a video given as images needs at least one frame")
    loaded = [load_image(image) for image in images]
    size = loaded[0].size
    same = [im if im.size == size else im.resize(size, Image.Resampling.BICUBIC) for im in loaded]
    return np.stack([np.asarray(im, dtype=np.uint8) for im in same])
