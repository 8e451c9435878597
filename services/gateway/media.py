"""Media parts -> validated bytes: data: URIs, guarded HTTP(S) fetches, allowed local paths.

Images are judged by their content (magic bytes, then PIL's header parser), never by a
Content-Type header, and their pixel count is checked from the header alone, before anything is
decoded: a 20000x20000 PNG is refused without allocating its pixels. So are, from their bytes
alone, a truncated JPEG or PNG and PNG text chunks too large to be metadata. Audio must name an
accepted container in its first bytes; videos and audio are otherwise only size-capped here: the
encoder decodes and validates them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import re
import urllib.parse
import zlib
from pathlib import Path

from PIL import Image, PngImagePlugin

from services.gateway.config import GatewayConfig
from services.gateway.fetch import MediaFetcher
from services.gateway.messages import MediaSpec
from shared.errors import InvalidRequestError
from shared.media.audio import FORMATS as AUDIO_FORMATS
from shared.media.audio import sniff_audio_format

IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
_WHITESPACE = re.compile(rb"\s+")
# PNG text (tEXt, zTXt, iTXt) and colour profile (iCCP) chunks: each may hold at most PIL's own
# per-chunk limit once inflated (PIL checks it only for chunks before the image data at open,
# the rest while decoding), and all together a few times that (bounded inflate work).
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt", b"iCCP")
MAX_PNG_TEXT_BYTES = PngImagePlugin.MAX_TEXT_CHUNK
MAX_PNG_TEXT_TOTAL = 4 * MAX_PNG_TEXT_BYTES


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


def _png_text_size(kind: bytes, body: bytes, limit: int) -> int:
    """Bytes a text/profile chunk holds once inflated, counting no further than `limit`."""
    if kind == b"tEXt":
        return len(body)
    _key, _, rest = body.partition(b"\0")
    if kind == b"iTXt":
        if len(rest) < 2 or rest[0] == 0:  # not compressed
            return len(rest)
        # Past the language tag and the translated keyword.
        rest = rest[2:].partition(b"\0")[2].partition(b"\0")[2]
    else:  # zTXt, iCCP: a compression-method byte, then zlib data
        rest = rest[1:]
    try:
        return len(zlib.decompressobj().decompress(rest, limit))
    except zlib.error:
        return 0  # PIL skips a corrupt compressed chunk


def png_problem(data: bytes) -> str | None:
    """Why a PNG is refused from its chunk list alone (lengths and types, plus inflating text
    chunks up to the limit; never the pixel data), or None. Chunk data is not CRC-checked."""
    pos, total, n = 8, 0, len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, end = data[pos + 4 : pos + 8], pos + 12 + length
        if end > n:
            break
        if kind == b"IEND":
            return None
        if kind in _PNG_TEXT_CHUNKS:
            size = _png_text_size(kind, data[pos + 8 : end - 4], MAX_PNG_TEXT_BYTES + 1)
            if size > MAX_PNG_TEXT_BYTES:
                return f"a PNG {kind.decode()} chunk holds over {MAX_PNG_TEXT_BYTES} bytes"
            total += size
            if total > MAX_PNG_TEXT_TOTAL:
                return f"the PNG's text chunks hold over {MAX_PNG_TEXT_TOTAL} bytes"
        pos = end
    return "the PNG is truncated (no IEND chunk)"


def _jpeg_scan_start(data: bytes) -> int:
    """Where the first scan's coded data begins, walking the segments as PIL does (an APPn
    segment may hold a whole thumbnail JPEG: skipped by its length), or -1."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):  # junk or fill: PIL skips it
            pos = data.find(b"\xff", pos + 1)
            if pos < 0:
                return -1
            continue
        marker = data[pos + 1]
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # RSTn, SOI, TEM: no length field
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # SOS
            return end
        pos = end
    return -1


def jpeg_truncated(data: bytes) -> bool:
    """No EOI marker after the first scan. Coded data never holds FF D9 (0xFF is stuffed), and
    whatever follows the EOI (a motion photo's video, a second MPO frame) is not looked at."""
    start = _jpeg_scan_start(data)
    return start < 0 or data.find(b"\xff\xd9", start) < 0


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
    if fmt == "MPO":  # multi-picture JPEG (many phone cameras): its first frame is a JPEG
        fmt = "JPEG"
    if fmt not in IMAGE_FORMATS:
        raise InvalidRequestError(f"unsupported image format {fmt}", param=param)
    if width * height > max_pixels:
        raise InvalidRequestError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            param=param,
        )
    problem = png_problem(data) if fmt == "PNG" else None
    if fmt == "JPEG" and jpeg_truncated(data):
        problem = "the JPEG is truncated (no end-of-image marker after its scan)"
    if problem:
        raise InvalidRequestError(f"cannot read image: {problem}", param=param)
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
        if spec.modality == "image":  # header parsing of up to 10 MB: not on the event loop
            await asyncio.to_thread(check_image, data, self.config.max_image_pixels, spec.param)
        elif not data:
            raise InvalidRequestError("empty media item", param=spec.param)
        elif spec.modality == "audio" and sniff_audio_format(data[:16]) is None:
            raise InvalidRequestError(
                f"unsupported audio format: {', '.join(AUDIO_FORMATS)} are accepted",
                param=spec.param,
            )
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
