"""Re-train the embedded default model: a small CNN on scikit-learn's 8x8 digits.

The weights ship inside the package (``gpu_worker/assets/digits_cnn.pt``) so that
``ringserve serve`` with no arguments answers real predictions offline, with no download.
The dataset also ships with scikit-learn, so this script needs no network either::

    pip install -e '.[train]'
    python examples/train_digits.py

It is deterministic (fixed seed, one thread) and takes a few seconds on a CPU. Besides
the weights it writes sample inputs next to itself for trying the server by hand:
``digit_<label>.png`` (32x32 grayscale, white digit on black as in the dataset) and
``digit_3.json`` (``{"data": [8 rows of 8 floats in 0..16]}``: one 8x8 image).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ringserve.gpu_worker.handlers.digits_net import PIXEL_MAX, DigitsNet

SEED = 0
EPOCHS = 40
BATCH = 64
SAMPLE_LABELS = (0, 3, 7)
SAMPLE_SIZE = 32  # pixels per side of the sample PNGs

HERE = Path(__file__).resolve().parent
ASSET = HERE.parent / "gpu_worker" / "assets" / "digits_cnn.pt"


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 75/25 split; images as float32 ``[N, 8, 8]`` in 0..16."""
    digits = load_digits()
    x = digits.images.astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def train(x: np.ndarray, y: np.ndarray) -> DigitsNet:
    model = DigitsNet()
    xt = torch.from_numpy(x).unsqueeze(1)
    yt = torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: DigitsNet, x: np.ndarray, y: np.ndarray) -> float:
    pred = model(torch.from_numpy(x).unsqueeze(1)).argmax(1).numpy()
    return float((pred == y).mean())


def write_samples(x: np.ndarray, y: np.ndarray) -> None:
    """One PNG per label in SAMPLE_LABELS and the JSON form of the "3", all from the test split."""
    for label in SAMPLE_LABELS:
        image = x[np.flatnonzero(y == label)[0]]
        pixels = np.round(image * (255.0 / PIXEL_MAX)).clip(0, 255).astype(np.uint8)
        png = Image.fromarray(pixels).resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.Resampling.NEAREST)
        png.save(HERE / f"digit_{label}.png")
    three = x[np.flatnonzero(y == 3)[0]]
    (HERE / "digit_3.json").write_text(json.dumps({"data": three.tolist()}) + "\n")


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = load_split()
    model = train(x_train, y_train)
    acc = accuracy(model, x_test, y_test)
    print(f"test accuracy: {acc:.4f} ({len(y_test)} held-out digits)")
    if acc < 0.97:
        raise SystemExit("accuracy below 0.97: not saving the weights")
    ASSET.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), ASSET)
    print(f"saved {ASSET} ({ASSET.stat().st_size} bytes)")
    write_samples(x_test, y_test)
    print(f"wrote samples to {HERE}")


if __name__ == "__main__":
    main()
