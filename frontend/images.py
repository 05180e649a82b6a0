"""Cheap checks on an encoded image before it goes to a worker: the format by its magic
bytes, and the declared pixel count from its header (an image bomb declares a huge size
in a few bytes; refusing it here costs no decode)."""

from __future__ import annotations

import struct

import numpy as np

from ringserve.frontend.errors import HTTPError, bad_request
from ringserve.ipc import bytes_tensor

_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


def sniff(body: bytes | memoryview, what: str = "body") -> str:
    """The image format ``body`` starts as; a 400 naming it as ``what`` (the request's
    body, or one element of a v2 BYTES tensor) when none."""
    for magic, name in _FORMATS:
        if body[: len(magic)] == magic:
            return name
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    raise bad_request(f"{what} is not a JPEG, PNG, GIF or WebP image")


def declared_size(body: bytes | memoryview, fmt: str) -> tuple[int, int]:
    """(width, height) from the header (a 400 when it cannot be read): what the decoder
    will allocate, before it does."""
    if fmt == "png":
        if len(body) < 24 or body[12:16] != b"IHDR":
            raise bad_request("truncated or malformed PNG header")
        return struct.unpack(">II", body[16:24])
    if fmt == "gif":
        return _gif_size(body)
    if fmt == "webp":
        return _webp_size(body)
    if fmt == "jpeg":
        i = 2
        while i + 9 < len(body):
            if body[i] != 0xFF:
                raise bad_request("malformed JPEG marker")
            marker = body[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack(">H", body[i + 2 : i + 4])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", body[i + 5 : i + 9])
                return w, h
            i += 2 + length
        raise bad_request("JPEG without a frame header")
    raise bad_request(f"no size is read from a {fmt} header")


def _gif_size(body: bytes | memoryview) -> tuple[int, int]:
    """The logical screen, grown to the first frame where it reaches past it: Pillow
    decodes a frame of 4 M pixels declared on a screen of 10x10 at the frame's size."""
    if len(body) < 13:
        raise bad_request("truncated GIF header")
    width, height, flags = struct.unpack("<HHB", body[6:11])
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    while i < len(body) and body[i] == 0x21:  # extensions before the first image
        i += 2
        while i < len(body) and body[i]:  # its sub-blocks, each led by its length
            i += 1 + body[i]
        i += 1
    if i + 9 > len(body) or body[i] != 0x2C:
        return width, height  # no frame to decode: the worker says so (a 400)
    left, top, w, h = struct.unpack("<HHHH", body[i + 1 : i + 9])
    return max(width, left + w), max(height, top + h)


def _webp_size(body: bytes | memoryview) -> tuple[int, int]:
    """The canvas (extended format, VP8X) or the frame (simple lossy VP8, lossless VP8L)."""
    chunk = bytes(body[12:16])
    if chunk == b"VP8X" and len(body) >= 30:
        return (
            int.from_bytes(body[24:27], "little") + 1,
            int.from_bytes(body[27:30], "little") + 1,
        )
    if chunk == b"VP8 " and len(body) >= 30 and body[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", body[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(body) >= 25 and body[20] == 0x2F:
        bits = int.from_bytes(body[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise bad_request("truncated or malformed WebP header")


def check_image(body: bytes | memoryview, max_pixels: int, what: str = "body") -> str:
    fmt = sniff(body, what)
    w, h = declared_size(body, fmt)
    if w == 0 or h == 0:
        raise bad_request(f"{fmt} declares an empty image")
    if w * h > max_pixels:
        raise HTTPError(413, f"{fmt} declares {w}x{h} pixels, over the limit of {max_pixels}")
    return fmt


def check_images(packed: np.ndarray, max_pixels: int, input_name: str) -> None:
    """``check_image`` on each element of a BYTES tensor of images (KServe v2, one encoded
    image per row), read in place; the error names the row."""
    for row, image in enumerate(bytes_tensor.elements(packed)):
        try:
            check_image(image, max_pixels, "the element")
        except HTTPError as err:
            raise HTTPError(err.status, f"input {input_name!r} row {row}: {err.message}") from None
