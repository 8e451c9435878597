"""Audio decoding (`shared.media.audio`): formats, downmix and resampling, limits, hostile input.

Every file is made here: WAV with the standard library's `wave`, FLAC and MP3 with PyAV.
"""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import pytest

from shared.media.audio import encode_wav, load_audio

RATE = 16000


def tone(seconds: float, freq: float, rate: int) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def pcm_wav(channels: list[np.ndarray], rate: int) -> bytes:
    """16-bit PCM WAV with one array per channel, through the standard library."""
    frames = np.stack([np.round(c * 32767).astype("<i2") for c in channels], axis=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return buf.getvalue()


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.argmax(spectrum) * rate / samples.size)


@pytest.mark.parametrize("codec", ["pcm_s16le", "flac", "mp3"])
def test_formats_decode_to_mono_float32(codec: str) -> None:
    x = tone(1.0, 440, RATE)
    y = load_audio(encode_wav(x, RATE, codec), RATE)
    assert y.dtype == np.float32 and y.ndim == 1
    if codec == "mp3":  # lossy, with encoder delay: same length within a frame, same pitch
        assert abs(y.size - x.size) <= 1152 + 529 and dominant_hz(y, RATE) == pytest.approx(
            440, abs=2
        )
    else:
        assert y.size == x.size and np.abs(y - x).max() < 1e-3


def test_resampling_keeps_duration_and_pitch() -> None:
    y = load_audio(pcm_wav([tone(1.5, 1000, 44100)], 44100), RATE)
    assert abs(y.size - 1.5 * RATE) <= 32
    assert dominant_hz(y, RATE) == pytest.approx(1000, abs=2)
    up = load_audio(pcm_wav([tone(1.0, 300, 8000)], 8000), RATE)
    assert abs(up.size - RATE) <= 32 and dominant_hz(up, RATE) == pytest.approx(300, abs=2)


def test_stereo_is_downmixed() -> None:
    left = tone(0.5, 440, RATE)
    # Channels are averaged (librosa's to_mono), not FFmpeg's 1/sqrt(2) downmix.
    one_side = load_audio(pcm_wav([left, np.zeros_like(left)], RATE), RATE)
    both = load_audio(pcm_wav([left, left], RATE), RATE)
    assert one_side.size == left.size
    assert np.abs(one_side - left / 2).max() < 1e-3 and np.abs(both - left).max() < 1e-3


def test_sources_path_data_url_and_base64(tmp_path) -> None:
    data = encode_wav(tone(0.3, 500, RATE), RATE)
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    outs = [load_audio(s, RATE) for s in (path, str(path), "data:audio/wav;base64," + b64, b64)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


def test_limits() -> None:
    data = encode_wav(tone(2.0, 440, RATE), RATE)
    with pytest.raises(ValueError, match="longer than 1 s"):
        load_audio(data, RATE, max_seconds=1.0)
    with pytest.raises(ValueError, match="byte limit"):
        load_audio(data, RATE, max_bytes=len(data) - 1)
    assert load_audio(data, RATE, max_seconds=2.0, max_bytes=len(data)).size == 2 * RATE
    # A model window: decoding stops there; a long clip is cut (same samples), not refused.
    full = load_audio(data, RATE)
    cut = load_audio(data, RATE, max_seconds=1.0, keep_seconds=0.75)
    np.testing.assert_array_equal(cut, full[: 3 * RATE // 4])
    resampled = load_audio(pcm_wav([tone(2.0, 440, 44100)], 44100), RATE)
    np.testing.assert_array_equal(
        load_audio(pcm_wav([tone(2.0, 440, 44100)], 44100), RATE, keep_seconds=1.0),
        resampled[:RATE],
    )


HOSTILE = {
    "empty": b"",
    "garbage": bytes(range(256)) * 8,
    "png_as_wav": b"\x89PNG\r\n\x1a\n" + b"\x00" * 200,
    "riff_header_only": b"RIFF\x24\x00\x00\x00WAVEfmt ",
    "text": b"hello, this is not audio at all",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_are_value_errors(name: str) -> None:
    with pytest.raises(ValueError):
        load_audio(HOSTILE[name], RATE)


def test_playlists_and_scripts_are_never_probed() -> None:
    """FFmpeg would follow an HLS playlist or a concat script to other files and URLs."""
    for data in (
        b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",
        b"<?xml version='1.0'?><MPD></MPD>",
    ):
        with pytest.raises(ValueError, match="unsupported audio format"):
            load_audio(data, RATE)


def test_truncated_and_lying_files() -> None:
    data = encode_wav(tone(1.0, 440, RATE), RATE)
    # A WAV cut in half decodes what is there (players do the same).
    half = load_audio(data[: len(data) // 2], RATE)
    assert 0 < half.size < RATE
    # A header claiming gigabytes of data over a few bytes: decodes the few bytes, no huge alloc.
    lying = bytearray(pcm_wav([tone(1.0, 440, RATE)], RATE)[:2000])
    assert lying[36:40] == b"data"  # the standard library's 44-byte header
    lying[40:44] = (2**31).to_bytes(4, "little")
    assert load_audio(bytes(lying), RATE).size < RATE
    with pytest.raises(ValueError):
        load_audio(b"fLaC" + b"\x00" * 64, RATE)  # a FLAC magic with no stream info


def test_bad_rate_and_missing_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="sampling rate"):
        load_audio(b"RIFF", 0)
    for missing in (str(tmp_path / "nope.wav"), tmp_path / "nope.wav"):
        with pytest.raises(ValueError, match="audio file not found"):
            load_audio(missing, RATE)
