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


def sniff(body: bytes | memoryview) -> str:
    for magic, name in _FORMATS:
        if body[: len(magic)] == magic:
            return name
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "webp"
    raise bad_request("body is not a JPEG, PNG, GIF or WebP image")


def declared_size(body: bytes | memoryview, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header, or None when the header does not say."""
    if fmt == "png":
        if len(body) < 24 or body[12:16] != b"IHDR":
            raise bad_request("truncated or malformed PNG header")
        return struct.unpack(">II", body[16:24])
    if fmt == "gif":
        if len(body) < 10:
            raise bad_request("truncated GIF header")
        return struct.unpack("<HH", body[6:10])
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
    return None


def check_image(body: bytes | memoryview, max_pixels: int) -> str:
    fmt = sniff(body)
    size = declared_size(body, fmt)
    if size is not None:
        w, h = size
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
            check_image(image, max_pixels)
        except HTTPError as err:
            raise HTTPError(err.status, f"input {input_name!r} row {row}: {err.message}") from None
