"""The small CNN behind the default ``digits`` model (scikit-learn's 8x8 digits).

Kept apart from the handler and from ``examples/train_digits.py`` so that both build the
same module, and a state_dict saved by one loads into the other. The net takes the raw
dataset scale (0..16) and normalises itself, so clients and the image path never need to
know the training statistics.
"""

from __future__ import annotations

import torch
from torch import nn

PIXEL_MAX = 16.0  # the dataset's pixel range is 0..16


class DigitsNet(nn.Module):
    """``[N, 1, 8, 8]`` float32 in 0..16 → ``[N, 10]`` logits. About 22k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 → 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(32 * 4 * 4, 32),
            nn.ReLU(inplace=True),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre on 0 with unit range: raw 0..16 → -1..1.
        x = x * (2.0 / PIXEL_MAX) - 1.0
        return self.classifier(self.features(x))
