"""Media parts -> validated bytes: data: URIs, guarded HTTP(S) fetches, allowed local paths.

Images are judged by their content (magic bytes, then PIL's header parser), never by a
Content-Type header, and their pixel count is checked from the header alone, before anything is
decoded: a 20000x20000 PNG is refused without allocating its pixels. Videos and audio are only
size-capped here; the encoder decodes and validates them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import re
import urllib.parse
from pathlib import Path

from PIL import Image

from services.gateway.config import GatewayConfig
from services.gateway.fetch import MediaFetcher
from services.gateway.messages import MediaSpec
from shared.errors import InvalidRequestError

IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
_WHITESPACE = re.compile(rb"\s+")


def sniff_image_format(head: bytes) -> str | None:
    """The image format from magic bytes, or None when it is not one we accept."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_image(data: bytes, max_pixels: int, param: str | None = None) -> tuple[str, int, int]:
    """(format, width, height) of an acceptable image, else InvalidRequestError."""
    if sniff_image_format(data[:16]) is None:
        raise InvalidRequestError(
            "unsupported image format: JPEG, PNG, GIF and WebP are accepted", param=param
        )
    try:
        # open() parses the header only; nothing is decoded until load(), which we never call.
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
            fmt, (width, height) = str(im.format), im.size
    except Image.DecompressionBombError as exc:
        raise InvalidRequestError(f"image has too many pixels: {exc}", param=param) from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad headers
        raise InvalidRequestError(f"cannot read image: {exc}", param=param) from exc
    if fmt not in IMAGE_FORMATS:
        raise InvalidRequestError(f"unsupported image format {fmt}", param=param)
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            param=param,
        )
    return fmt, width, height


def decode_base64(text: str | bytes, max_bytes: int, param: str | None) -> bytes:
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    raw = _WHITESPACE.sub(b"", raw)
    if len(raw) // 4 * 3 > max_bytes + 2:  # refuse before decoding
        raise InvalidRequestError(f"media exceeds the {max_bytes}-byte limit", param=param)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(f"invalid base64 data: {exc}", param=param) from exc
    if len(data) > max_bytes:
        raise InvalidRequestError(f"media exceeds the {max_bytes}-byte limit", param=param)
    return data


def decode_data_uri(uri: str, max_bytes: int, param: str | None) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidRequestError("data: URIs must be base64 (data:<type>;base64,...)", param=param)
    return decode_base64(payload, max_bytes, param)


class MediaLoader:
    def __init__(self, config: GatewayConfig, fetcher: MediaFetcher) -> None:
        self.config = config
        self.fetcher = fetcher
        root = config.allowed_local_media_path
        self.allowed_root = Path(os.path.realpath(root)) if root else None

    def cap(self, spec: MediaSpec) -> int:
        if spec.modality == "image":
            return self.config.max_image_bytes
        return self.config.max_media_bytes

    async def load(self, spec: MediaSpec) -> bytes:
        data = await self._read(spec, self.cap(spec))
        if spec.modality == "image":
            check_image(data, self.config.max_image_pixels, spec.param)
        elif not data:
            raise InvalidRequestError("empty media item", param=spec.param)
        return data

    async def _read(self, spec: MediaSpec, cap: int) -> bytes:
        if spec.b64 is not None:
            return decode_base64(spec.b64, cap, spec.param)
        src = spec.source or ""
        if src[:5].lower() == "data:":
            return decode_data_uri(src, cap, spec.param)
        try:
            scheme = urllib.parse.urlsplit(src).scheme.lower()
        except ValueError as exc:
            raise InvalidRequestError(f"invalid media URL: {exc}", param=spec.param) from exc
        if scheme in ("http", "https"):
            return await self.fetcher.fetch(src, cap, param=spec.param)
        if scheme in ("file", ""):
            return await asyncio.to_thread(self._read_local, src, cap, spec.param)
        raise InvalidRequestError(f"unsupported media URL scheme {scheme!r}", param=spec.param)

    def _read_local(self, src: str, cap: int, param: str) -> bytes:
        if self.allowed_root is None:
            raise InvalidRequestError(
                "local media paths are disabled (see --allowed-local-media-path)", param=param
            )
        if src.lower().startswith("file:"):
            parts = urllib.parse.urlsplit(src)  # already parsed once in _read: cannot fail
            if parts.netloc not in ("", "localhost"):
                raise InvalidRequestError("file:// URLs must name a local path", param=param)
            src = urllib.parse.unquote(parts.path)
        # realpath resolves symlinks and `..` first, so the check is on the file actually read.
        try:
            real = Path(os.path.realpath(src))
        except (OSError, ValueError) as exc:  # e.g. an embedded NUL
            raise InvalidRequestError(f"invalid local path: {exc}", param=param) from exc
        if not real.is_relative_to(self.allowed_root):
            raise InvalidRequestError(
                "local media path is outside the allowed directory", param=param
            )
        try:
            with open(real, "rb") as f:
                data = f.read(cap + 1)
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot read local media: {exc.strerror}", param=param
            ) from exc
        if len(data) > cap:
            raise InvalidRequestError(f"media exceeds the {cap}-byte limit", param=param)
        return data

    async def load_all(self, specs: list[MediaSpec]) -> list[bytes]:
        tasks = [asyncio.ensure_future(self.load(s)) for s in specs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:  # the first failure decides; don't leave fetches running
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
