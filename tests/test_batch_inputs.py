"""The worker's batch path on a model with several inputs (``gpu_worker/batch_inputs``):
rows counted and checked across the inputs, requests grouped by each input's row shape,
batched input by input, and views of a request's slot copied before ``infer`` may
change them; a one-input model's tensor goes through untouched."""

from __future__ import annotations

import pytest
import torch

from ringserve.gpu_worker import batch_inputs as bi
from ringserve.gpu_worker.handlers.base import OutputContractError


def test_rows_are_checked_across_the_inputs() -> None:
    t = torch.zeros(3, 2)
    assert bi.checked_rows(t) == 3 and bi.rows(t) == 3
    assert bi.checked_rows(torch.tensor(1.0)) == "a scalar"
    assert bi.checked_rows({"a": torch.zeros(2, 4), "b": torch.zeros(2)}) == 2
    assert bi.checked_rows({}) == "an empty dict"
    assert bi.checked_rows({"a": torch.zeros(2, 4), "b": torch.zeros(3)}) == (
        "tensors of different rows (a: 2, b: 3)"
    )
    assert bi.checked_rows({"a": torch.zeros(2), "b": torch.tensor(1)}) == (
        "tensors of different rows (a: 2, b: a scalar)"
    )


def test_requests_batch_together_only_when_every_input_has_the_same_row_shape() -> None:
    short = {"ids": torch.zeros(1, 3, dtype=torch.long), "mask": torch.ones(1, 3)}
    also_short = {"ids": torch.ones(2, 3, dtype=torch.long), "mask": torch.zeros(2, 3)}
    longer = {"ids": torch.zeros(1, 5, dtype=torch.long), "mask": torch.ones(1, 5)}
    assert bi.group_key(short) == bi.group_key(also_short) != bi.group_key(longer)
    assert bi.group_key(torch.zeros(4, 3)) == (torch.float32, (3,))
    batch = bi.concat([short, also_short])
    assert isinstance(batch, dict) and batch["ids"].tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert batch["mask"].shape == (3, 3)
    assert bi.expand({"ids": torch.tensor([[7]])}, 3)["ids"].tolist() == [[7], [7], [7]]


def test_views_of_a_slot_are_copied_and_nothing_else_is() -> None:
    base = torch.zeros(8)
    lo = base.data_ptr()
    inside, outside = base[:4].reshape(1, 4), torch.ones(1, 4)
    got = bi.owned({"a": inside, "b": outside}, lo, lo + 32)
    assert isinstance(got, dict)
    assert got["a"].data_ptr() != inside.data_ptr() and got["b"] is outside
    assert bi.owned(outside, lo, lo + 32) is outside


def test_what_preprocess_may_return() -> None:
    import numpy as np

    t = torch.zeros(1)
    assert bi.as_inputs(t) is t
    both = bi.as_inputs({"a": t, "b": np.ones((1, 2), np.float32)})
    assert isinstance(both, dict) and both["b"].tolist() == [[1.0, 1.0]]
    for wrong in ({"a": [1.0]}, {}, [t]):
        with pytest.raises(OutputContractError, match="preprocess returned"):
            bi.as_inputs(wrong)
