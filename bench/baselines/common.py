"""The models and the request/response handling every baseline shares.

The same work ringserve does per request, so the comparison is about serving, not about
the model: identity takes ``{"data": [floats]}`` and returns it; resnet50
(``torchvision.models.resnet50(weights=None)``, its BatchNorms folded into the
convolutions and NHWC on a CPU, as ringserve runs it)
takes a JPEG body, decodes it with PIL (draft mode, as ringserve's ``vision`` handler),
resizes the shorter side to 256, centre-crops 224, normalises, and answers the top
class as ``{"label", "index", "score"}``.

Imports torch: load it only in processes that run the model.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
RESIZE, CROP = 256, 224


class BadRequest(ValueError):
    pass


def memory_format(name: str, device: str) -> torch.memory_format:
    """The layout a model runs in: NHWC for the convnet on a CPU, as ringserve's vision
    handler runs it (oneDNN's faster layout), so the comparison is about serving."""
    if name == "resnet50" and device == "cpu":
        return torch.channels_last
    return torch.contiguous_format


def load_model(name: str, threads: int, device: str = "cpu") -> torch.nn.Module:
    torch.set_num_threads(max(1, threads))
    if name == "identity":
        return torch.nn.Identity()
    if name == "resnet50":
        import torchvision
        from torch.fx.experimental.optimization import fuse

        # Folded as ringserve's vision handler folds it (``fold_batchnorm``): the same
        # network, so the comparison stays about serving.
        model = fuse(torchvision.models.resnet50(weights=None).eval()).to(device)
        model = model.to(memory_format=memory_format(name, device))
        with torch.inference_mode():  # first call allocates; keep it out of the measurement
            model(torch.zeros(1, 3, CROP, CROP, device=device))
        return model
    raise ValueError(f"unknown model {name!r} (identity or resnet50)")


def decode_identity(body: bytes) -> torch.Tensor:
    try:
        data = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadRequest(f"bad body: {e}") from None
    return decode_identity_data(data)


def decode_identity_data(data: Any) -> torch.Tensor:
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"bad data: {e}") from None
    if arr.ndim != 1 or not np.isfinite(arr).all():
        raise BadRequest("data must be a flat list of finite numbers")
    return torch.from_numpy(arr)


def decode_image(body: bytes) -> torch.Tensor:
    """JPEG bytes -> normalised float32 [3, 224, 224] (ringserve's recipe)."""
    import torchvision.transforms.v2.functional as F
    from PIL import Image

    try:
        with Image.open(io.BytesIO(body)) as im:
            im.draft("RGB", (RESIZE, RESIZE))
            pixels = np.array(im.convert("RGB"))
    except Exception as e:
        raise BadRequest(f"could not decode image: {e}") from None
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    image = F.resize(image, [RESIZE], antialias=True)
    image = F.center_crop(image, [CROP, CROP])
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def decode(model_name: str, body: bytes) -> torch.Tensor:
    return decode_identity(body) if model_name == "identity" else decode_image(body)


def run_batch(model: torch.nn.Module, model_name: str, inputs: list[torch.Tensor]) -> list[Any]:
    """Stack, run, and turn each row into the JSON-able result ringserve would answer."""
    if len({tuple(x.shape) for x in inputs}) != 1:  # ragged identity inputs: one at a time
        return [r for x in inputs for r in run_batch(model, model_name, [x])]
    device = next(model.parameters(), torch.zeros(0)).device
    with torch.inference_mode():
        out = model(torch.stack(inputs).to(device))
        if model_name == "identity":
            return out.cpu().numpy().tolist()
        probs = out.softmax(dim=1).cpu()
    score, idx = probs.max(dim=1)
    return [
        {"label": int(i), "index": int(i), "score": float(s)}
        for s, i in zip(score.tolist(), idx.tolist(), strict=True)
    ]


def response(result: Any, batch_size: int) -> bytes:
    return json.dumps({"result": result, "batch_size": batch_size}).encode()
