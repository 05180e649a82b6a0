"""``torchvision:ARCH``: an image classifier from ``torchvision.models``, and image decoding.

Weights come only from a local file (``weights = "/path/state_dict.pt"``), loaded with
``weights_only=True`` so a checkpoint cannot run code. Nothing is ever downloaded: a
server must start the same way with or without network, and a model with no weights
file runs with random initialisation behind a loud warning (useful for load tests only).

Model options (``[models.NAME.options]``):

- ``image_size`` (224): side of the square crop the network sees; the shorter side is
  first resized to ``image_size * 256 / 224`` (the usual ImageNet evaluation recipe).
- ``num_classes`` (1000): size of the classifier head, and of ``OUTPUT0``.
- ``labels_file`` (none): text file with one class label per line, ``num_classes`` lines.
- ``channels_last`` (on for CPU, off for CUDA): run the network in NHWC memory format.
  On a CPU, oneDNN's NHWC convolutions are faster: resnet50 with 2 threads on this
  project's 2-vCPU VM, batch 1 101.6 against 118.5 ms, batch 4 367 against 437 ms
  (same weights, interleaved). On a GPU it depends on the card and dtype, so it stays a
  choice there.
- ``fold_batchnorm`` (on): fold every BatchNorm that directly follows a convolution into
  that convolution's weights and bias at load (``torch.fx``): the same function, to
  float rounding, with one pass over each layer's activations fewer. resnet50, 2
  threads, NHWC, on this project's 2-vCPU VM: batch 1 63.1 against 66.5 ms, batch 4
  about 5 % faster. A model that ``torch.fx`` cannot trace runs as built (logged).
- ``max_image_pixels`` (40,000,000): refuse images whose header declares more pixels,
  before decoding them (an image bomb is small on the wire and huge in memory). With
  ``threads`` above 1, up to that many are decoded at once.

``decode_payload`` and ``tensor_from_payload`` are shared with the ``digits`` handler.
"""

from __future__ import annotations

import difflib
import io
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ringserve.gpu_worker.handlers.base import BadInput, Handler, TensorSpec
from ringserve.gpu_worker.handlers.weights import load_state_dict
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.layout import PayloadKind

log = logging.getLogger("ringserve.worker")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
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


def fold_batchnorm(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model`` (in eval mode) with each convolution's BatchNorm folded into it, or
    ``model`` itself when ``torch.fx`` cannot trace it (data-dependent control flow)."""
    from torch.fx.experimental.optimization import fuse

    before = _batchnorms(model)
    try:
        folded = fuse(model)  # a traced copy; ``model`` is left as it was
    except Exception as e:  # fx raises whatever the model's forward raises on proxies
        log.warning("model %s: BatchNorm not folded, it runs as built (%s)", name, e)
        return model
    log.info(
        "model %s: folded %d of %d BatchNorm layers", name, before - _batchnorms(folded), before
    )
    return folded


def _batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def read_labels(path: str) -> tuple[str, ...]:
    """One label per line; blank lines at the end are ignored."""
    return tuple(Path(path).read_text(encoding="utf-8").rstrip("\n").split("\n"))


def check_architecture(arch: str) -> None:
    """Refuse an architecture this torchvision does not have, naming the nearest ones."""
    if not arch:
        raise ValueError("torchvision handler needs an architecture: torchvision:ARCH")
    known = torchvision.models.list_models(torchvision.models)
    if arch not in known:
        near = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ValueError(
            f"torchvision {torchvision.__version__} has no classification model {arch!r}{hint}"
        )


class TorchvisionHandler(Handler):
    known_options = frozenset(
        {
            "image_size",
            "num_classes",
            "labels_file",
            "channels_last",
            "fold_batchnorm",
            "max_image_pixels",
        }
    )
    task = "classification"
    accepts_images = True
    preprocess_thread_safe = True  # it reads only what ``load`` set

    def __init__(self, settings: ModelSettings, arg: str = "") -> None:
        super().__init__(settings, arg)
        check_architecture(arg)  # here, not in load: a typo is a config error, never retried
        opts = settings.options
        self.image_size = int(opts.get("image_size", 224))
        self.resize_size = round(self.image_size * 256 / 224)
        self.num_classes = int(opts.get("num_classes", 1000))
        option = opts.get("channels_last")
        self.channels_last: bool | None = None if option is None else bool(option)  # see load
        self.fold_batchnorm = bool(opts.get("fold_batchnorm", True))
        self.max_pixels = int(opts.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
        # Normalisation as one multiply-add on the uint8 pixels: (x / 255 - mean) / std
        # = x * scale + bias, in one pass into the output (to_dtype then normalize made
        # three passes and two temporaries: 0.5 ms of a 224x224 image's ~2.7 ms here).
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.scale = 1 / (255 * std)
        self.bias = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std
        self.inputs = (TensorSpec("INPUT0", "float32", (3, self.image_size, self.image_size)),)
        self.outputs = (TensorSpec("OUTPUT0", "float32", (self.num_classes,)),)
        self.model: torch.nn.Module | None = None

    def load(self, device: torch.device) -> None:
        model = torchvision.models.get_model(self.arg, weights=None, num_classes=self.num_classes)
        if self.settings.weights:
            load_state_dict(model, self.settings.weights)
        else:
            log.warning(
                "model %s: no weights file for torchvision:%s; it runs with RANDOM "
                "initialisation and its predictions are meaningless (set weights = PATH "
                "to a state_dict; ringserve never downloads weights)",
                self.settings.name,
                self.arg,
            )
        labels_file = self.settings.options.get("labels_file")
        if labels_file:
            labels = read_labels(labels_file)
            if len(labels) != self.num_classes:
                raise ValueError(
                    f"{labels_file}: {len(labels)} labels for {self.num_classes} classes"
                )
            self.labels = labels
        model = model.eval()
        if self.fold_batchnorm:
            model = fold_batchnorm(model, self.settings.name)
        model = model.to(device)
        if self.channels_last is None:  # unset: by device
            self.channels_last = device.type == "cpu"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.device = device

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        """TENSOR: ``[rows, 3, S, S]`` as sent; IMAGE: ``[1, 3, S, S]`` normalised float32."""
        if kind != PayloadKind.IMAGE:
            return tensor_from_payload(payload)
        image = decode_payload(payload, "RGB", self.max_pixels, self.resize_size)
        image = F.resize(image, [self.resize_size], antialias=True)
        image = F.center_crop(image, [self.image_size, self.image_size])
        # Written in the layout the network runs in: ``infer``'s conversion is then free.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((1, 3, self.image_size, self.image_size), memory_format=layout)
        torch.addcmul(self.bias, image, self.scale, out=out[0])
        return out

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        assert self.model is not None, "load() was not called"
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(batch).softmax(dim=1)
