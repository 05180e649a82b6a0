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

Image decoding is in ``images.py``, which the ``digits`` handler shares without this
module's ``import torchvision`` (1.2 s in a worker's start, most of it ``torch._dynamo``).
"""

from __future__ import annotations

import difflib
import logging

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as F

from ringserve.gpu_worker.handlers.base import (
    BadInput,
    Handler,
    TensorSpec,
    bool_option,
    int_option,
    read_labels,
)
from ringserve.gpu_worker.handlers.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_payload,
    tensor_from_payload,
)
from ringserve.gpu_worker.handlers.weights import load_state_dict
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.layout import PayloadKind

log = logging.getLogger("ringserve.worker")
# Seed of the random weights of a model served without a weights file (see load).
RANDOM_INIT_SEED = 0

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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


# The widest shape a classification crop is taken from: resized (short side to 256), a
# 64:1 image is 16384x256, 12 MiB. An image is refused beyond it: the short side of a
# 2000x1 banner of 91 bytes became 256 pixels and the long 512000 (375 MiB), which the
# pixel limit, counting the image sent, did not bound; and a crop of so few stretched
# pixels is no picture a classifier knows.
MAX_ASPECT = 64


def resize_for_center_crop(image: torch.Tensor, resize: int) -> torch.Tensor:
    """``image`` (``[C, H, W]``) with its short side scaled to ``resize``, as
    torchvision's classification transform does before its centre crop; BadInput for a
    shape past ``MAX_ASPECT``."""
    _, height, width = image.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise BadInput(
            f"image of {width}x{height} pixels: more than {MAX_ASPECT} times as wide as high "
            "(or the reverse), past what a classification crop is taken from"
        )
    return F.resize(image, [resize], antialias=True)


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
        self.image_size = int_option(settings, "image_size", 224)
        self.resize_size = round(self.image_size * 256 / 224)
        self.num_classes = int_option(settings, "num_classes", 1000)
        self.channels_last = bool_option(settings, "channels_last", None)  # None: see load
        self.fold_batchnorm = bool(bool_option(settings, "fold_batchnorm", True))
        self.max_pixels = int_option(settings, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
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
        if self.settings.weights:
            model = torchvision.models.get_model(
                self.arg, weights=None, num_classes=self.num_classes
            )
            load_state_dict(model, self.settings.weights)
        else:
            # The same random weights in every worker and after every recycle: two
            # workers of one model answered one image differently, and a recycle
            # changed every answer (a fixed seed, with the process's own RNG untouched).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = torchvision.models.get_model(
                    self.arg, weights=None, num_classes=self.num_classes
                )
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
        image = resize_for_center_crop(image, self.resize_size)
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
