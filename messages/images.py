"""Images a request attaches (contract v2): checked before any vendor sees them.

A data URL's bytes must be the image its media type names, with a readable size in
its header: a PNG, JPEG, GIF or WebP header is read (never the pixels), in time
linear in the bytes and without a decoder library. An `https://` URL is allowed
only for listed hosts: the vendor library may fetch it from the worker, so any
other host would be a server-side request forgery path.

The size gives the prompt's token estimate: the largest of what OpenAI (512-pixel
tiles after scaling) and Anthropic (pixels / 750 after scaling to 1568 on the
long side) charge for it, so a budget reserved on it holds on either. An image
behind a URL has no size here: it is estimated at the most either charges.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

MEDIA_TYPES = ("png", "jpeg", "webp", "gif")
DATA_URL = re.compile(r"data:image/(png|jpeg|webp|gif);base64,")
MAX_URL_CHARS = 2048
MAX_SIDE = 100_000  # pixels: a header claiming more is not an image anyone can send
URL_IMAGE_TOKENS = 1600  # the most an image costs: Anthropic, at 1568 on the long side


class ImageProblem(ValueError):
    """The attachment breaks the contract; the message names the rule."""


@dataclass(frozen=True)
class Image:
    """One checked attachment: the URL the vendor gets, and what the history keeps."""

    url: str  # the data URL or the https URL, as the request gave it
    media_type: str  # "image/png", ...; "" for a URL (the vendor learns it)
    data: bytes  # the decoded bytes of a data URL; b"" for a URL
    sha256: str  # of `data`; "" for a URL
    tokens: int  # the prompt estimate


def image_tokens(width: int, height: int) -> int:
    """What the larger of OpenAI's and Anthropic's counts is for this size."""
    # OpenAI, detail high: fit in 2048 x 2048, shortest side to 768, 170 a 512 tile + 85.
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    openai = 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
    # Anthropic: the long side to at most 1568, then pixels / 750.
    scale = min(1.0, 1568 / max(width, height))
    anthropic = math.ceil(width * scale * (height * scale) / 750)
    return max(openai, anthropic, 1)


def check_image(url: str, *, max_bytes: int, url_hosts: Collection[str]) -> Image:
    """The checked image behind `url`, or ImageProblem naming what is wrong."""
    if url.startswith("data:"):
        return _data_image(url, max_bytes)
    if url.startswith("https://"):
        return _url_image(url, url_hosts)
    raise ImageProblem("must be a data:image/(png|jpeg|webp|gif);base64 URL or an https:// URL")


def _data_image(url: str, max_bytes: int) -> Image:
    prefix = DATA_URL.match(url)
    if prefix is None:
        raise ImageProblem("a data URL must start data:image/(png|jpeg|webp|gif);base64,")
    kind = prefix.group(1)
    encoded = url[prefix.end():]
    if len(encoded) // 4 * 3 > max_bytes + 2:  # refused before decoding anything
        raise ImageProblem(f"the image is about {len(encoded) // 4 * 3} bytes; "
                           f"limits.max_attachment_bytes is {max_bytes}")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageProblem(f"the data URL is not valid base64 ({exc})") from None
    if len(data) > max_bytes:
        raise ImageProblem(f"the image is {len(data)} bytes; limits.max_attachment_bytes is "
                           f"{max_bytes}")
    width, height = image_size(kind, data)
    return Image(url=url, media_type=f"image/{kind}", data=data,
                 sha256=hashlib.sha256(data).hexdigest(), tokens=image_tokens(width, height))


def _url_image(url: str, url_hosts: Collection[str]) -> Image:
    if len(url) > MAX_URL_CHARS:
        raise ImageProblem(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ImageProblem("the URL holds whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageProblem(f"the URL cannot be parsed ({exc})") from None
    host = (parts.hostname or "").rstrip(".")
    if parts.username is not None or parts.password is not None:
        raise ImageProblem("the URL may not carry a user name or password")
    if not host:
        raise ImageProblem("the URL names no host")
    if port not in (None, 443):
        raise ImageProblem(f"the URL names port {port}; only 443 is allowed")
    if host not in {h.lower().rstrip(".") for h in url_hosts}:
        allowed = ", ".join(sorted(url_hosts)) or "none are configured"
        raise ImageProblem(f"host {host!r} is not in limits.image_url_hosts ({allowed})")
    return Image(url=url, media_type="", data=b"", sha256="", tokens=URL_IMAGE_TOKENS)


def image_size(kind: str, data: bytes) -> tuple[int, int]:
    """(width, height) from the header of a `kind` image; ImageProblem if it is not one."""
    size = _READERS[kind](data)
    if size is None:
        raise ImageProblem(f"the bytes are not a {kind.upper()} image (no readable header)")
    width, height = size
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ImageProblem(f"the {kind.upper()} header says {width} x {height} pixels; each side "
                           f"must be 1 to {MAX_SIDE}")
    return width, height


def _png(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _gif(data: bytes) -> tuple[int, int] | None:
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 10:
        return None
    return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")


# JPEG start-of-frame markers (SOF0-SOF15 but DHT C4, JPG C8 and DAC CC): they hold the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length follows


def _jpeg(data: bytes) -> tuple[int, int] | None:
    if data[:3] != b"\xff\xd8\xff":
        return None
    at = 2
    while at + 4 <= len(data):  # each segment is skipped by its length: linear
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if at + 9 > len(data):
                return None
            return (int.from_bytes(data[at + 7:at + 9], "big"),
                    int.from_bytes(data[at + 5:at + 7], "big"))
        at += 2 + length
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    return None


_READERS = {"png": _png, "gif": _gif, "jpeg": _jpeg, "webp": _webp}
