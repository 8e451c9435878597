"""Image loading: every accepted source -> an upright RGB ``PIL.Image``.

Mirrors ``transformers.image_utils.load_image`` (path, http(s) URL, base64 / data URL, PIL) plus raw
bytes, with two deliberate differences: transparency is composited onto white (what
``convert_to_rgb`` in the transformers image processors and ``qwen_vl_utils`` do; a plain
``convert("RGB")`` would expose whatever colour hides under transparent pixels), and failures are
``ValueError`` with a short description instead of echoing the whole (possibly huge) input.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | bytes | bytearray | Path | Image.Image

DEFAULT_TIMEOUT_S = 10.0


def _describe(source: object) -> str:
    text = repr(source)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_data_url(url: str) -> bytes:
    """Payload of a ``data:<mime>;base64,<payload>`` URL."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise ValueError(f"only base64 data URLs are supported, got {_describe(url)}")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64 payload in data URL: {exc}") from exc


def fetch_url(url: str, timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
    """Plain http(s) GET. The gateway uses its own guarded fetcher; this is for local use."""
    request = urllib.request.Request(url, headers={"User-Agent": "prism/0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        raise ValueError(f"could not fetch {_describe(url)}: {exc}") from exc


def read_source_bytes(source: str | bytes | bytearray | Path, timeout: float) -> bytes:
    """Bytes behind a path, URL, data URL, bare base64 string or bytes (shared with video)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, Path):
        return source.read_bytes()
    if source.startswith(("http://", "https://")):
        return fetch_url(source, timeout)
    if source.startswith("data:"):
        return decode_data_url(source)
    path = Path(source)
    # Long strings are never paths: checking them would raise "File name too long".
    if len(source) < 4096 and path.is_file():
        return path.read_bytes()
    try:  # transformers also accepts a bare base64 string
        return base64.b64decode(source, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            "image source must be a file path, http(s) URL, data URL, base64 string or bytes; "
            f"got {_describe(source)}"
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent areas become white."""
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, *, timeout: float = DEFAULT_TIMEOUT_S) -> Image.Image:
    """Load ``source`` as an upright RGB image (EXIF orientation applied)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, bytes, bytearray, Path)):
        data = read_source_bytes(source, timeout)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now so truncated files fail here, not later
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"could not decode image ({len(data)} bytes): {exc}") from exc
    else:
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    return to_rgb(ImageOps.exif_transpose(image))
