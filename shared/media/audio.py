"""Audio decoding (PyAV): WAV, MP3, FLAC or Ogg (judged by their bytes) -> mono float32 at the
model's sampling rate.

`av.AudioResampler` converts the sample format and rate; channels are then averaged.
Limits are checked while decoding, never after: the byte cap before FFmpeg sees the data, the
duration cap on the resampled output as it grows (a small file that claims or decodes to hours
of audio stops at the cap). Every failure is a ``ValueError`` with a short message, which the
services turn into a 400.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.media.image import DEFAULT_TIMEOUT_S, read_source_bytes

if TYPE_CHECKING:
    import av

AudioSource = str | bytes | bytearray | Path

DEFAULT_MAX_SECONDS = 600.0  # 10 minutes of audio; Qwen2-Audio itself reads the first 30 s
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
_REMOTE = ("http://", "https://", "data:")
FORMATS = ("WAV", "MP3", "FLAC", "Ogg")


def _read(source: AudioSource, max_bytes: int, timeout: float) -> bytes:
    if isinstance(source, (str, Path)) and not str(source).startswith(_REMOTE):
        data = _read_local(source, max_bytes)
    else:
        data = read_source_bytes(source, timeout)  # bytes, http(s) or data: URL
    if len(data) > max_bytes:
        raise ValueError(f"audio is over the {max_bytes}-byte limit")
    return data


def _read_local(source: str | Path, max_bytes: int) -> bytes:
    """A file path, else (strings only) bare base64, as transformers' loaders accept."""
    text = str(source)
    path = Path(text) if len(text) < 4096 else None  # long strings are never paths
    if path is not None and path.is_file():
        if path.stat().st_size > max_bytes:
            raise ValueError(f"audio file is over the {max_bytes}-byte limit")
        return path.read_bytes()
    if isinstance(source, str):
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise ValueError(f"audio file not found (nor base64 data): {text[:120]}")


def sniff_audio_format(head: bytes) -> str | None:
    """The FFmpeg demuxer for an accepted container, from its magic bytes; None otherwise."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"  # an ID3 tag, or straight into an MPEG audio frame
    return None


def _open(data: bytes) -> av.container.InputContainer:
    """Open with the demuxer the bytes name, never FFmpeg's own probe: a probed playlist or
    concat script would make FFmpeg open other URLs and files on the server's behalf."""
    import av  # PyAV loads FFmpeg: only processes that decode media pay for it

    if not data:
        raise ValueError("audio is empty")
    fmt = sniff_audio_format(data[:16])
    if fmt is None:
        raise ValueError(f"unsupported audio format: {', '.join(FORMATS)} are accepted")
    try:
        container = av.open(io.BytesIO(data), mode="r", format=fmt)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise ValueError(f"could not open audio: {exc}") from exc
    if not container.streams.audio:
        container.close()
        raise ValueError("no audio stream in input")
    return container


def _chunks(container: av.container.InputContainer, rate: int) -> Iterator[np.ndarray]:
    """Mono float32 chunks of the first audio stream at `rate`, the resampler's tail included."""
    import av

    # Channels are kept through the resampler and averaged here: librosa's `to_mono` (what
    # Qwen2-Audio's examples load clips with). FFmpeg's own downmix scales by 1/sqrt(2) instead.
    resampler = av.AudioResampler(format="fltp", rate=rate)
    for frame in container.decode(container.streams.audio[0]):
        for out in resampler.resample(frame):
            yield out.to_ndarray().mean(axis=0)  # planar: (channels, n)
    for out in resampler.resample(None):
        yield out.to_ndarray().mean(axis=0)


def _resampled(
    container: av.container.InputContainer, rate: int, max_samples: int, keep: int | None
) -> np.ndarray:
    """Decode until `keep` samples are in (the rest would be thrown away), else to the end;
    past `max_samples` is an error."""
    import av

    chunks: list[np.ndarray] = []
    total = 0
    try:
        for chunk in _chunks(container, rate):
            chunks.append(chunk)
            total += chunk.size
            if keep is not None and total >= keep:
                break
            if total > max_samples:
                raise ValueError(f"audio is longer than {max_samples / rate:g} s")
    except av.FFmpegError as exc:
        if not chunks:
            raise ValueError(f"could not decode audio: {exc}") from exc
        # A damaged tail after good audio: keep what decoded (as players do).
    if not chunks:
        raise ValueError("audio has no samples")
    return np.concatenate(chunks)[:keep].astype(np.float32, copy=False)


def load_audio(
    source: AudioSource,
    sampling_rate: int,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    keep_seconds: float | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> np.ndarray:
    """Decode ``source`` (path, bytes, http(s) or data URL, base64) to mono float32 in [-1, 1]
    at ``sampling_rate`` Hz. ``keep_seconds``: only the first that many seconds are wanted
    (a model's window): decoding stops there, and longer clips are cut, not refused."""
    if sampling_rate <= 0:
        raise ValueError(f"sampling rate must be positive, got {sampling_rate}")
    data = _read(source, max_bytes, timeout)
    container = _open(data)
    try:
        keep = None if keep_seconds is None else round(keep_seconds * sampling_rate)
        samples = _resampled(container, sampling_rate, round(max_seconds * sampling_rate), keep)
    finally:
        container.close()
    if not np.isfinite(samples).all():
        raise ValueError("audio holds non-finite samples")
    return samples


def encode_wav(samples: np.ndarray, sampling_rate: int, codec: str = "pcm_s16le") -> bytes:
    """Mono float32 samples -> a WAV (or, with codec "flac" / "mp3", that format) file's bytes.

    For tests and examples: the formats the decoder above must read, made without downloads.
    """
    import av

    fmt = {"pcm_s16le": "wav", "flac": "flac", "mp3": "mp3", "libmp3lame": "mp3"}[codec]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sampling_rate, layout="mono")
        sample_fmt = stream.codec_context.format.name
        frame = av.AudioFrame.from_ndarray(
            np.asarray(samples, dtype=np.float32)[None], format="flt", layout="mono"
        )
        frame.sample_rate = sampling_rate
        resampler = av.AudioResampler(format=sample_fmt, layout="mono", rate=sampling_rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
