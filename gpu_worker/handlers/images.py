"""Image decoding, shared by the handlers that accept images (``digits``, ``torchvision``).

Not in ``vision.py``: that module imports torchvision, whose ``__init__`` imports all of
``torchvision.ops`` and, through it, ``torch._dynamo``: 1.2 s of each start of a worker
on this project's 2-vCPU VM, for a model (the default, ``digits``) that uses none of it.
PIL, which decodes here, comes with torchvision.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ringserve.gpu_worker.handlers.base import BadInput

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

# Filters set once, not per image: ``warnings.catch_warnings`` is not thread-safe, and
# images are decoded on several threads at once (gpu_worker/preprocess_pool.py). PIL
# warns on images over its own limit; ours (``max_pixels``, checked first) is the one
# that counts: ignored in the whole process (a worker; PIL's error past twice its limit
# still applies). torch warns on the read-only pixels ``decode_payload`` wraps: every
# caller only reads them.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, re.escape(__name__) + r"\Z"
)


def tensor_from_payload(payload: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without sharing a read-only array.

    torch warns on (and must not write through) a non-writable array, such as a
    read-only view of shared memory; such a payload is copied instead.
    """
    if not payload.flags.writeable:
        payload = payload.copy()
    return torch.from_numpy(payload)


def decode_payload(
    payload: np.ndarray,
    mode: str,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    min_side: int = 0,
) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, anything PIL reads) → uint8 ``[C, H, W]``.

    ``mode`` is a PIL mode: "RGB" (C = 3) or "L" (grayscale, C = 1). The size declared in
    the header is checked before any pixel is decoded. ``min_side`` lets a JPEG decode
    at a reduced scale that still keeps both sides >= ``min_side`` (far cheaper for
    large photos that are about to be shrunk anyway). EXIF orientation is applied.

    PIL rather than ``torchvision.io.decode_image``: torchvision 0.29 deprecates its
    image codecs (a DeprecationWarning on every call), and PIL is already a dependency.
    """
    data = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise BadInput(f"image too large: {width}x{height} pixels (limit {max_pixels})")
            if min_side:
                im.draft(mode, (min_side, min_side))
            # In place: without an orientation tag it is then a no-op, not a copy.
            ImageOps.exif_transpose(im, in_place=True)
            upright = im if im.mode == mode else _eight_bit(im).convert(mode)
            # asarray wraps PIL's packed bytes (read-only) where array copied them again.
            tensor = torch.from_numpy(np.asarray(upright))
    except BadInput:
        raise
    except Image.DecompressionBombError as e:
        raise BadInput(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise BadInput("could not decode image: not a known image format") from None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data
        raise BadInput(f"could not decode image: {e}") from None
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PNG, TIFF: modes ``I;16*``, or ``I`` as PIL opens such
    a PNG) scaled to 8 bits. PIL's own conversion clips instead: every value over 255 of
    65535 became white, and a 16-bit scan of a digit was answered as another digit."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    wide = np.asarray(im).astype(np.uint32, copy=False)
    return Image.fromarray((wide >> 8).astype(np.uint8), "L")
