"""A model served through ``torch.compile`` (``models.NAME.compile = true``).

Why: inductor with the weights frozen into the graph runs resnet50 on a 2-core CPU in
41-47 ms for one image against 62-69 ms eager, and a batch of 4 in 155-161 ms against
195-204 ms (docs/benchmarks.md). The price is paid at start: a compile per batch size,
seconds to a minute each, cached on disk for the next start.

Static shapes, padded up to a few sizes: one graph with a dynamic batch dimension ran a
batch of 4 no faster than eager (185-206 ms), while a graph per size keeps the gain. So
each of the profile's sizes (1, 2, 4, ... ``max_batch_size``) is compiled once at start,
before the worker says ready (and ``preferred_batch_size``), and a batch between two of
them is padded up to the next with copies of its last row, whose answers are cut off
again. Rows are independent (the start-up batchmate check warns for a model where they
are not), so padding changes no answer, which a start-up check holds the model to. A
request never waits for a compile.

The compile runs in the worker's own process (``compile_threads = 1``), not in a pool of
compile processes: the supervisor watches, recycles and kills a worker as one process.
Compiled kernels are cached under ``$XDG_CACHE_HOME/ringserve/inductor`` (systemd:
``/var/cache/ringserve/ringserve/inductor``; the supervisor sets
``TORCHINDUCTOR_CACHE_DIR`` so for its workers unless the operator did), so a restart,
a recycled worker or a sibling loads them (resnet50: 12 s against 25 s cold).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils._pytree import tree_map

from ringserve.gpu_worker.batch_check import TOLERANCE, sample_rows
from ringserve.gpu_worker.handlers.base import Handler
from ringserve.gpu_worker.profile import out_of_memory
from ringserve.ipc.errors import ConfigError
from ringserve.ipc.layout import PayloadKind

log = logging.getLogger("ringserve.worker")

COMPILED_ATTRIBUTE = "model"  # the handler attribute that ``compile`` compiles


class Bucketed(torch.nn.Module):
    """``compiled`` run only at ``sizes`` rows: a batch in between is padded up to the
    next size with copies of its last row, and its answer cut back to the batch."""

    def __init__(self, compiled: torch.nn.Module, sizes: Sequence[int], name: str = "") -> None:
        super().__init__()
        self.compiled = compiled
        self.sizes = sorted(sizes)
        self.name = name
        self._graphs: int | None = None  # dynamo's count once the start-up compile is done

    def compiled_all(self) -> None:
        """The start-up compile is done: any compile from now on is one that a batch
        waits for (seconds), which ``forward`` says in the log."""
        self._graphs = _graphs()

    def forward(self, batch: torch.Tensor) -> object:
        out = self._run(batch)
        if self._graphs is not None and _graphs() != self._graphs:
            self._graphs = _graphs()
            log.warning(
                "model %s: compiled again while a batch waited (%s %s, strides %s): "
                "TORCH_LOGS=recompiles in the worker's environment logs why",
                self.name,
                str(batch.dtype).removeprefix("torch."),
                list(batch.shape),
                list(batch.stride()),
            )
        return out

    def _run(self, batch: torch.Tensor) -> object:
        rows = batch.shape[0]
        size = next((s for s in self.sizes if s >= rows), rows)
        if size == rows:
            return self.compiled(batch)
        padded = _empty_like_rows(batch, size)  # made here: an inference tensor
        padded[:rows] = batch
        if rows:
            padded[rows:] = batch[-1:]
        else:  # a request of no rows (KServe v2 allows a shape [0, ...])
            padded.zero_()
        out = self.compiled(padded)
        return tree_map(lambda t: _first_rows(t, rows, size), out)


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (read afresh: tests clear counters)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _empty_like_rows(batch: torch.Tensor, size: int) -> torch.Tensor:
    """An empty batch of ``size`` rows laid out as ``batch`` (NHWC stays NHWC): the graph
    for ``size`` rows was compiled for that layout, and its guards check strides."""
    shape = (size, *batch.shape[1:])
    if batch.dim() and batch.stride(0) == math.prod(batch.shape[1:]):  # rows outermost
        return torch.empty_strided(shape, batch.stride(), dtype=batch.dtype, device=batch.device)
    return batch.new_empty(shape)


def _first_rows(value: object, rows: int, size: int) -> object:
    """A padded output cut back to the batch's rows: every tensor whose first dimension
    is the padded size (rows are dimension 0: the start-up check holds a model to it)."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size:
        return value[:rows]
    return value


def ran_out_of_room(error: BaseException) -> bool:
    """A full disk or device memory running out, also where the compiler wrapped it
    (dynamo raises ``BackendCompilerFailed`` from None, keeping ``inner_exception``): a
    load failure to retry, not a model that cannot be compiled."""
    return _caused_by(error, lambda e: isinstance(e, OSError) or out_of_memory(e))


def _caused_by(error: BaseException, what: Callable[[BaseException], bool]) -> bool:
    """``error`` is, or was raised for, an error that ``what`` holds true of (through
    the compiler's wrapping too)."""
    seen: BaseException | None = error
    for _ in range(8):  # (a chain, not a cycle: bounded all the same)
        if seen is None:
            return False
        if what(seen):
            return True
        # (Not __context__: an error the compiler handled on its way to this one.)
        seen = getattr(seen, "inner_exception", None) or seen.__cause__
    return False


def compile_module(module: torch.nn.Module, sizes: int) -> torch.nn.Module:
    """``module`` as ringserve compiles it, for ``sizes`` batch sizes (compiled on first
    call each; ``bench.raw_model --compile`` times the same)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: what makes the CPU graph fast
    inductor_config.compile_threads = 1  # in this process: no pool of compile processes
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, sizes + 1)
    return torch.compile(module, dynamic=False)


def compilable_module(handler: Handler, name: str) -> torch.nn.Module:
    """The handler's eager ``model``, or a ConfigError saying why it cannot be compiled."""
    module = getattr(handler, COMPILED_ATTRIBUTE, None)
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(
            f"models.{name}.compile: a TorchScript model cannot be compiled; serve the "
            "eager model (a python: handler) to compile it, or set compile = false"
        )
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            f"models.{name}.compile: the handler has no torch.nn.Module in its "
            f"{COMPILED_ATTRIBUTE!r} attribute to compile (its infer must call "
            f"self.{COMPILED_ATTRIBUTE}), or set compile = false"
        )
    if len(handler.inputs) > 1:
        raise ConfigError(
            f"models.{name}.compile: the model takes {len(handler.inputs)} inputs; compile "
            "buckets a model of one input tensor, so set compile = false"
        )
    spec = handler.inputs[0]
    if spec.dtype == "bytes":
        raise ConfigError(
            f"models.{name}.compile: {spec.name} is BYTES; the compile runs the model on "
            "sample rows of its declared input, which it cannot make of bytes"
        )
    if any(d < 0 for d in spec.shape):
        raise ConfigError(
            f"models.{name}.compile: {spec.name} has a dimension of any size "
            f"({list(spec.shape)}); a compiled model needs a fixed row shape (each new "
            "shape would compile again while a request waits)"
        )
    return module


def compile_handler(
    handler: Handler,
    name: str,
    sizes: Sequence[int],
    sample: Callable[[int], torch.Tensor],
    heartbeat: Callable[[], None],
) -> tuple[float, list[int]]:
    """Replace the handler's ``model`` by its compiled, bucketed form, compile every size
    in ``sizes`` now (``sample(n)``: a batch of ``n`` preprocessed rows) and check that a
    padded batch answers as the eager model. Returns the seconds it took and the sizes
    compiled. Errors of the compiler propagate: the caller names them.

    A size that runs out of device memory ends the compile there, as it ends the eager
    profile: the sizes below it are served, and every larger one would run out too. Only
    the smallest size running out is an error (a load failure: no batch fits)."""
    module = compilable_module(handler, name)
    bucketed = Bucketed(compile_module(module, len(sizes)), sizes, name)
    setattr(handler, COMPILED_ATTRIBUTE, bucketed)
    t0 = time.perf_counter()
    compiled: list[int] = []
    with torch.inference_mode():
        for size in sorted(sizes):
            t = time.perf_counter()
            try:
                handler.infer(sample(size).to(handler.device))
            except Exception as e:
                if not compiled or not _caused_by(e, out_of_memory):
                    raise
                break  # (the caller says so, with the cap it sets)
            took = time.perf_counter() - t
            log.info("model %s: compiled for batches of %d in %.1f s", name, size, took)
            compiled.append(size)
            heartbeat()
        if len(compiled) < len(sizes):  # (out of the except block: its frames held memory)
            bucketed.sizes = compiled
            if handler.device.type == "cuda":
                torch.cuda.empty_cache()
        _check_padding(handler, module, bucketed, name)
    bucketed.compiled_all()
    return time.perf_counter() - t0, compiled


def _check_padding(
    handler: Handler, module: torch.nn.Module, bucketed: Bucketed, name: str
) -> None:
    """A batch between two sizes, of rows that differ (the batchmate check's random
    rows: integer inputs differ too), answers as the eager model does: padding and
    cutting back assume that rows are dimension 0 of what ``infer`` passes the model and
    of what it returns (a sequence-first model breaks that)."""
    rows = next((n for n in range(2, max(bucketed.sizes)) if n not in bucketed.sizes), 0)
    if not rows:
        return
    batch = handler.preprocess(sample_rows(handler, rows), PayloadKind.TENSOR)
    batch = batch.to(handler.device)
    got = handler.infer(batch)
    setattr(handler, COMPILED_ATTRIBUTE, module)
    try:
        want = handler.infer(batch)
    finally:
        setattr(handler, COMPILED_ATTRIBUTE, bucketed)
    try:
        # As loose as the batchmate check: on a GPU, TF32 convolutions pick other
        # algorithms for another batch size and move logits by 1e-3 or more; rows out of
        # place move an answer by its whole size.
        torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE)
    except (AssertionError, TypeError, ValueError) as e:
        why = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"models.{name}.compile: a batch of {rows} rows, padded to the next compiled "
            f"size, answered differently from the eager model ({why}). Padding needs rows "
            "in dimension 0 of the model's input and output; a model in training mode "
            "(Dropout) also answers differently on every run"
        ) from None
