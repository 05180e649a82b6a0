"""The pinned staging buffer's reuse. Pinning needs CUDA, so ``pin`` is the identity
here and tests/test_gpu.py serves through the real one; what is checked here is that
one buffer serves every dtype and row shape and grows only to the largest batch."""

from __future__ import annotations

import torch

from ringserve.gpu_worker.staging import PinnedStaging


def pins() -> tuple[PinnedStaging, list[int]]:
    """A staging buffer whose pins are counted (as sizes) and whose releases of the
    outgrown buffer's pinned memory are counted too (as -1)."""
    pinned: list[int] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(t.numel())
        return t

    return PinnedStaging(pin, lambda: pinned.append(-1)), pinned


def test_one_buffer_serves_every_length_of_a_variable_input() -> None:
    """A text model's sequences of 100 lengths pinned 100 buffers, each max_batch_size
    rows, and kept them all."""
    staging, pinned = pins()
    for length in range(1, 101):
        rows = [torch.full((1, length), float(length)), torch.zeros(2, length)]
        got = staging.gather(rows, min_rows=8)
        assert got.shape == (3, length) and got.dtype == torch.float32
        assert torch.equal(got, torch.cat(rows))
    grown = [n for n in pinned if n > 0]
    assert len(grown) < 10, pinned  # grown a few times, not once per length
    assert pinned.count(-1) == len(grown) - 1  # each outgrown buffer's pages given back
    assert staging.capacity <= 2 * 8 * 100 * 4 + 64  # at most twice the largest batch


def test_dtypes_share_it_and_a_larger_batch_grows_it_once() -> None:
    staging, pinned = pins()
    a = staging.gather([torch.arange(6, dtype=torch.int64).view(3, 2)], min_rows=4)
    assert a.tolist() == [[0, 1], [2, 3], [4, 5]] and pinned == [64]
    b = staging.gather([torch.ones(4, 2, dtype=torch.uint8)], min_rows=4)  # fits
    assert b.dtype == torch.uint8 and b.sum() == 8 and pinned == [64]
    c = staging.gather([torch.ones(9, 2, dtype=torch.int64)], min_rows=4)  # past capacity
    assert c.shape == (9, 2) and pinned == [64, -1, 192]
    h = staging.gather([torch.tensor([[True, False]]), torch.tensor([[False, True]])])
    assert h.tolist() == [[True, False], [False, True]] and len(pinned) == 3


def test_several_inputs_share_the_buffer_each_in_its_own_aligned_stretch() -> None:
    """A text model's ids and mask: each batched into its own part of the one buffer,
    none overlapping another, the buffer grown once for both at ``min_rows``."""
    staging, pinned = pins()
    ids = [torch.arange(3, dtype=torch.int64).view(1, 3), torch.ones(2, 3, dtype=torch.int64)]
    mask = [torch.ones(1, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)]
    got = staging.gather_named({"ids": ids, "mask": mask}, min_rows=4)
    assert torch.equal(got["ids"], torch.cat(ids)) and torch.equal(got["mask"], torch.cat(mask))
    assert pinned == [192]  # min_rows of each: 4 rows of 24 bytes (128), 4 of 3 (64)
    start = got["mask"].data_ptr() - got["ids"].data_ptr()
    assert start == 128 and start % 64 == 0  # after the ids' 72 bytes, aligned
    again = staging.gather_named({"ids": ids[:1], "mask": mask[:1]}, min_rows=4)  # fits
    assert again["ids"].tolist() == [[0, 1, 2]] and pinned == [192]
