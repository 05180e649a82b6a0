"""How many CUDA devices torch sees here, and when none, why, in torch's own words.

A worker asked for ``cuda`` on a host where torch sees none stops the start with a
configuration error. "No NVIDIA driver" was a guess: a CPU-only torch build, a driver
too old for the wheel's CUDA (CUDA 13 wheels want driver 580 or newer) and a hidden
device all read the same. torch says which as a warning when it fails to initialise
CUDA; this passes it on.
"""

from __future__ import annotations

import warnings

import torch


def cuda_devices() -> tuple[int, str]:
    """(devices torch sees, why there are none: empty when there are some)."""
    if torch.version.cuda is None:
        return 0, f"this torch build ({torch.__version__}) has no CUDA support"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return torch.cuda.device_count(), ""
    if caught:
        return 0, f"torch could not initialise CUDA: {str(caught[0].message).strip()}"
    return 0, (
        "torch sees no CUDA device here (no NVIDIA driver loaded, or CUDA_VISIBLE_DEVICES "
        "hides them)"
    )
