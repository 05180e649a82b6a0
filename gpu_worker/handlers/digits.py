"""``digits``: the default model, a small CNN for 8x8 handwritten digits, embedded.

It exists so that ``ringserve serve`` with no arguments serves a real model offline: the
weights (~90 KB, ``gpu_worker/assets/digits_cnn.pt``, made by
``examples/train_digits.py``) ship in the package and need no download.

Input is the scikit-learn digits format: float32 ``[rows, 8, 8]`` (or one ``[8, 8]``)
with values 0..16, bright digit on a dark background. An image (PNG/JPEG) is turned into
the same: grayscale, area-averaged down to 8x8, 0..255 scaled to 0..16. Like the
dataset, it expects a light digit on a dark background (no automatic inversion). Output is
``[rows, 10]`` softmax probabilities for the labels "0".."9".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ringserve.gpu_worker.handlers.base import Handler, TensorSpec, int_option
from ringserve.gpu_worker.handlers.digits_net import PIXEL_MAX, DigitsNet
from ringserve.gpu_worker.handlers.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_payload,
    tensor_from_payload,
)
from ringserve.gpu_worker.handlers.weights import load_state_dict
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.layout import PayloadKind

SIDE = 8
ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_cnn.pt"


class DigitsHandler(Handler):
    platform = "pytorch_libtorch"
    task = "classification"
    accepts_images = True
    preprocess_thread_safe = True  # it reads only what ``load`` set
    labels = tuple(str(d) for d in range(10))
    known_options = frozenset({"max_image_pixels"})
    inputs = (TensorSpec("INPUT0", "float32", (SIDE, SIDE)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (10,)),)
    model: DigitsNet  # set by load()

    def __init__(self, settings: ModelSettings, arg: str = "") -> None:
        super().__init__(settings, arg)
        # Read once, at start: a bad value read per image failed every image request.
        self.max_pixels = int_option(settings, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)

    def load(self, device: torch.device) -> None:
        path = self.settings.weights or ASSET
        net = DigitsNet()
        load_state_dict(net, path)
        self.model = net.eval().to(device)
        self.device = device

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        """→ float32 ``[rows, 8, 8]`` in 0..16 (the channel dimension is added in ``infer``)."""
        if kind != PayloadKind.IMAGE:
            x = tensor_from_payload(payload)
            return x.unsqueeze(0) if x.dim() == 2 else x
        image = decode_payload(payload, "L", self.max_pixels, SIDE).to(torch.float32)
        # Area (box) averaging is how the dataset itself was made: each of its 8x8 values
        # counts the ink in one 4x4 block of a 32x32 bitmap. It is antialiased by nature,
        # and unlike a bilinear filter it does not bleed a block into its neighbours.
        image = torch.nn.functional.adaptive_avg_pool2d(image, (SIDE, SIDE))  # [1, 8, 8]
        return image.mul_(PIXEL_MAX / 255.0)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """``[N, 8, 8]`` (or ``[N, 1, 8, 8]``) → ``[N, 10]`` probabilities."""
        if batch.dim() == 3:
            batch = batch.unsqueeze(1)
        with torch.inference_mode():
            return self.model(batch).softmax(dim=1)
