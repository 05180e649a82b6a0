"""A model served through ``torch.compile`` (``models.NAME.compile = true``).

Why: inductor with the weights frozen into the graph runs resnet50 on a 2-core CPU in
41-47 ms for one image against 64-69 ms eager, and a batch of 4 in 155-161 ms against
195-203 ms (docs/benchmarks.md). The price is paid at start: a compile per batch size,
seconds to a minute each, cached on disk for the next start.

Static shapes, padded up to a few sizes: one graph with a dynamic batch dimension ran a
batch of 4 no faster than eager (185-206 ms), while a graph per size keeps the gain. So
each of the profile's sizes (1, 2, 4, ... ``max_batch_size``) is compiled once at start,
before the worker says ready, and a batch between two of them is padded up to the next
with copies of its last row, whose answers are cut off again. Rows are independent (the
start-up batchmate check warns for a model where they are not), so padding changes no
answer. A request never waits for a compile.

The compile runs in the worker's own process (``compile_threads = 1``), not in a pool of
compile processes: the supervisor watches, recycles and kills a worker as one process.
Compiled kernels are cached under ``$XDG_CACHE_HOME/ringserve/inductor`` (systemd:
``/var/cache/ringserve/ringserve/inductor``; the supervisor sets
``TORCHINDUCTOR_CACHE_DIR`` so for its workers unless the operator did), so a restart or
a recycled worker loads them instead of compiling again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from ringserve.gpu_worker.handlers.base import Handler
from ringserve.ipc.errors import ConfigError

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
        self._counters: dict | None = None  # dynamo's, once the start-up compile is done
        self._graphs = 0

    def compiled_all(self) -> None:
        """The start-up compile is done: any compile from now on is one that a batch
        waits for (seconds), which ``forward`` says in the log."""
        from torch._dynamo.utils import counters

        self._counters = counters["stats"]
        self._graphs = self._counters["unique_graphs"]

    def forward(self, batch: torch.Tensor) -> object:
        out = self._run(batch)
        if self._counters is not None and self._counters["unique_graphs"] != self._graphs:
            self._graphs = self._counters["unique_graphs"]
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
        if not batch.is_inference() and torch.is_inference_mode_enabled():
            # The graphs were compiled for inference tensors, which is what the worker's
            # loop makes; one made outside it (an image preprocessed on a pool thread, as
            # a lone request's batch) fails the graph's guards and compiled again, here.
            batch = batch.clone()
        rows = batch.shape[0]
        size = next((s for s in self.sizes if s >= rows), rows)
        if size == rows:
            return self.compiled(batch)
        padded = torch.cat((batch, batch[-1:].expand(size - rows, *batch.shape[1:])))
        if batch.dim() == 4 and batch.is_contiguous(memory_format=torch.channels_last):
            # The graph was compiled for the layout the handler passes (its guards check
            # strides): a padded batch in another layout would compile again, here.
            padded = padded.contiguous(memory_format=torch.channels_last)
        return _first_rows(self.compiled(padded), rows)


def _first_rows(out: object, rows: int) -> object:
    if isinstance(out, torch.Tensor):
        return out[:rows]
    if isinstance(out, tuple | list):
        return type(out)(_first_rows(o, rows) for o in out)
    if isinstance(out, dict):
        return {k: _first_rows(v, rows) for k, v in out.items()}
    return out


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
    spec = handler.inputs[0]
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
) -> float:
    """Replace the handler's ``model`` by its compiled, bucketed form and compile every
    size in ``sizes`` now (``sample(n)``: a batch of ``n`` preprocessed rows). Returns
    the seconds it took. Errors of the compiler propagate: the caller names them."""
    module = compilable_module(handler, name)
    bucketed = Bucketed(compile_module(module, len(sizes)), sizes, name)
    setattr(handler, COMPILED_ATTRIBUTE, bucketed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for size in sorted(sizes):
            t = time.perf_counter()
            handler.infer(sample(size).to(handler.device))
            log.info(
                "model %s: compiled for batches of %d in %.1f s",
                name,
                size,
                time.perf_counter() - t,
            )
            heartbeat()
    bucketed.compiled_all()
    return time.perf_counter() - t0
