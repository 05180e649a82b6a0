"""Handlers used only by tests: a slow one (deadlines, full queues, disconnects), a
poisonous one (raises on 13, kills its process on 666), a leaking one (host memory) and
one that leaks on its device (GPU memory, on a GPU), one that fails to load, one that
frees memory as it loads, one that counts its page faults, one that reports its threads,
one with a BYTES input, one with a BYTES output, one that breaks the handler contract,
one that says which thread preprocessed each image, one that records its exit and
one with several outputs and one with several inputs."""

from __future__ import annotations

import atexit
import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import torch

from ringserve.gpu_worker.handlers.base import BadInput, Handler, TensorSpec
from ringserve.ipc.layout import PayloadKind


class Slow(Handler):
    """Identity that sleeps ``input[0, 0]`` milliseconds per batch (capped at 10 s)."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(min(float(batch[:, 0].max()), 10_000) / 1000)
        return batch


class SlowUnlucky(Slow):
    """Slow, and a batch holding a row whose second value is 13 raises (after the sleep)."""

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        out = super().infer(batch)
        if bool((batch[:, 1] == 13).any()):
            raise ValueError("13 is unlucky")
        return out


class Poison(Handler):
    """Identity, except a row starting with 13 raises, one starting with 666 kills us
    one starting with 667 calls sys.exit(0) and one starting with 668 exits 3 (a code
    ringserve's workers use only at start: BOOT). One starting with 669 raises as a CUDA
    device-side assert does, and so does every later call in this process, as on a GPU
    (the context stays broken)."""

    device_broken = False

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        first = batch[:, 0]
        if bool((first == 666).any()):
            os._exit(99)
        if bool((first == 667).any()):
            sys.exit(0)  # a handler ending its process "cleanly", mid-request
        if bool((first == 668).any()):
            os._exit(3)
        if bool((first == 669).any()):
            Poison.device_broken = True
        if Poison.device_broken:
            raise torch.AcceleratorError(
                "CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"
            )
        if bool((first == 13).any()):
            raise ValueError("13 is unlucky")
        return batch * 1


class OutOfMemoryOnBatches(Handler):
    """Identity, but a batch of more than one request runs out of device memory while a
    tensor of it is live in the failing frame; a request run alone afterwards refuses to
    run while that tensor is still held (on a GPU, the memory the retries need). The
    warm-up profile's batches (zeros) run: it would otherwise cap batching at 1."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)
    _scratch: weakref.ref | None = None

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > 1 and bool(batch.any()):
            activations = torch.empty(1 << 20)
            OutOfMemoryOnBatches._scratch = weakref.ref(activations)
            print(f"a batch of {batch.shape[0]} ran out of memory")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 MiB")
        held = OutOfMemoryOnBatches._scratch
        if held is not None and held() is not None:
            raise RuntimeError("the failed batch's memory is still held")
        return batch * 1


class _Doubles(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class CompiledOutOfMemoryFrom4(Handler):
    """A compilable model (``model`` doubles its input) whose batches of 4 rows or more
    run out of device memory, from inside the compiled call, as a GPU too small for
    ``max_batch_size`` does."""

    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (4,)),)

    def load(self, device: torch.device) -> None:
        self.device = device
        self.model = _Doubles()

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] >= 4:
            print(f"a batch of {batch.shape[0]} rows ran out of device memory")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(batch)


class Leaky(Handler):
    """Identity that keeps 1 MiB per batch forever: a real, private, growing leak."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)
    hoard: list = []  # the leak is the point

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        chunk = bytearray(2**20)
        chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page: counted in USS
        self.hoard.append(chunk)
        return batch


class DeviceLeaky(Leaky):
    """Identity that keeps 32 MiB per batch forever on its device: on a GPU, memory that
    torch's allocator counts as allocated (``memory_allocated``), the GPU leak the
    supervisor's ``gpu_allocated_limit_mb`` is for; on a CPU, touched host memory."""

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        self.hoard.append(torch.ones(8 * 2**20, device=batch.device))  # 32 MiB of float32
        return batch


class FailsToLoad(Handler):
    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        raise RuntimeError("weights file is corrupt")

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class FailsToLoadAndExitsSlowly(FailsToLoad):
    """Fails to load, and its exit's clean-up (an atexit callback, as torch and models
    register them) takes ``options.exit_s`` seconds: a stop sent meanwhile reaches a
    process already on its way out."""

    def load(self, device: torch.device) -> None:
        atexit.register(time.sleep, float(self.settings.options.get("exit_s", 10)))
        super().load(device)


class LoadsSlowly(FailsToLoad):
    """Takes ``options.load_s`` seconds to load (a large model on a slow disk); with
    ``options.child_pids``, meanwhile runs a child process (as torch.compile runs a
    compiler) and appends its pid to that file."""

    def load(self, device: torch.device) -> None:
        print("loading slowly")  # a log line of its worker: a test waits for it
        pids = self.settings.options.get("child_pids")
        if pids:
            child = subprocess.Popen(["sleep", "300"])
            with open(str(pids), "a") as f:
                f.write(f"{child.pid}\n")
        time.sleep(float(self.settings.options["load_s"]))
        self.device = device


class FreesMemoryAtLoad(FailsToLoad):
    """Touches ``options.mb`` MB of host memory while it loads and frees it, as reading
    a checkpoint does, and writes its process's RSS before that to ``options.rss_file``."""

    def load(self, device: torch.device) -> None:
        import psutil

        with open(str(self.settings.options["rss_file"]), "w") as f:
            f.write(str(psutil.Process().memory_info().rss))
        scratch = np.ones(int(self.settings.options["mb"]) << 18, np.float32)
        del scratch
        self.device = device


class CountsPageFaults(Handler):
    """Frees 60 MB of activations in each batch, as a forward does, and answers the
    minor page faults its process took meanwhile (one number per row)."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a, b = np.ones(30 << 18, np.float32), np.ones(30 << 18, np.float32)
        del a, b
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        return torch.full((batch.shape[0], 1), float(faults))


class FailsFirstLoad(FailsToLoad):
    """Fails to load until the file ``options.marker`` exists (it creates it on the
    first try): a load error that goes away, as a GPU busy at boot does. Its rows are
    64 floats (256 bytes), so a small ``arena.slot_bytes`` holds few of them."""

    inputs = (TensorSpec("INPUT0", "float32", (64,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (64,)),)

    def load(self, device: torch.device) -> None:
        marker = str(self.settings.options["marker"])
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("device busy, try again")
        self.device = device


class LoadsOnlyOnce(Slow):
    """Slow, and loads only while the file ``options.marker`` does not exist (it
    creates it): its replacements fail to load, as a worker's do once its GPU is gone."""

    def load(self, device: torch.device) -> None:
        marker = str(self.settings.options["marker"])
        if os.path.exists(marker):
            raise RuntimeError("the device is gone")
        open(marker, "w").close()
        self.device = device


class ThreadCount(Handler):
    """Sleeps ``input[0, 0]`` milliseconds, then answers the torch threads it ran with."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(min(float(batch[:, 0].max()), 10_000) / 1000)
        return torch.full((batch.shape[0], 1), float(torch.get_num_threads()))


class ByteLengths(Handler):
    """A BYTES input (KServe v2): each element's length in bytes, as float32, and -1 where
    the element is not UTF-8 (so a test can tell the bytes arrived as sent)."""

    inputs = (TensorSpec("INPUT0", "bytes", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        def length(b: bytes) -> float:
            try:
                b.decode()
            except UnicodeDecodeError:
                return -1.0
            return float(len(b))

        rows = [[length(b) for b in row] for row in payload.tolist()]
        return torch.tensor(rows, dtype=torch.float32)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class BytesWithoutPreprocess(ByteLengths):
    """Declares a BYTES input but keeps the default preprocess: refused at creation."""

    preprocess = Handler.preprocess


class EchoesText(Handler):
    """BYTES in, BYTES out: each element read as text the way a handler takes any bytes
    (UTF-8 with ``surrogateescape``) and answered as that text; one that starts with
    "refuse" is refused (BadInput) with the text in the message."""

    inputs = (TensorSpec("INPUT0", "bytes", (1,)),)
    outputs = (TensorSpec("OUTPUT0", "bytes", (1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device
        self.texts: dict[float, str] = {}

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        keys = []
        for (element,) in payload.tolist():
            text = element.decode("utf-8", "surrogateescape")
            if text.startswith("refuse"):
                raise BadInput(f"refused: {text}")
            key = float(len(self.texts) + 1)
            self.texts[key] = text
            keys.append([key])
        return torch.tensor(keys)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def postprocess(self, output: torch.Tensor) -> np.ndarray:
        out = np.empty((output.shape[0], 1), dtype=object)
        out[:, 0] = [self.texts.pop(key) for key in output[:, 0].tolist()]
        return out


class Describe(Handler):
    """A BYTES output: each row as text (``[1, 2.5]`` -> ``"1,2.5"``); a row starting with
    -1 answers ``b"\\xff"`` (not UTF-8), one starting with 13 an int (not bytes or str)."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "bytes", (1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def postprocess(self, output: torch.Tensor) -> np.ndarray:
        def text(row: list[float]) -> object:
            if row[0] == -1:
                return b"\xff"
            if row[0] == 13:
                return 13
            return ",".join(f"{v:g}" for v in row)

        out = np.empty((output.shape[0], 1), dtype=object)
        out[:, 0] = [text(row) for row in output.tolist()]
        return out


class MixesRows(Handler):
    """Each row minus the batch's mean row: a model whose rows meet (batch statistics,
    attention over the batch), so one NaN row would spoil every row of its batch. A
    first value of 200 sleeps 300 ms first, so that requests behind it queue up."""

    inputs = (TensorSpec("INPUT0", "float32", (2,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (2,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch[:, 0] == 200).any()):
            time.sleep(0.3)
        return batch - batch.mean(0, keepdim=True)


class Misbehaves(Handler):
    """Identity that raises on an all-zero batch: what the start-up batch profile feeds a
    handler (a TorchServe-style image decoder fails the same way); refuses negatives in
    ``infer``; and breaks its own declaration when a row starts with 1001 (float64),
    1002 (an extra dimension), 1003 (a tuple, not a tensor) or 1004 (one row too few),
    or the handler contract when one starts with 1005 (preprocess returns a list) or
    1006 (preprocess drops the row); 1007 answers NaN; 1008 takes 2 s (others batch up
    behind it)."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        if payload.size and payload.flat[0] == 1005:
            return payload.tolist()  # type: ignore[return-value]  # the bug under test
        if payload.size and payload.flat[0] == 1006:
            return super().preprocess(payload[:0], kind)
        return super().preprocess(payload, kind)

    def infer(self, batch: torch.Tensor) -> object:
        if not bool(batch.any()):
            raise ValueError("all zeros: not a real input")
        if bool((batch < 0).any()):
            raise BadInput("negatives are not allowed")  # refused in infer: still a 400
        first = set(batch[:, 0].tolist())
        if 1001 in first:
            return batch.double()
        if 1002 in first:
            return batch[..., None]
        if 1003 in first:
            return batch, batch
        if 1004 in first:
            return batch[1:]
        if 1007 in first:
            return batch * float("nan")
        if 1008 in first:
            time.sleep(2.0)
        return batch


class DeclaresFloat64(Handler):
    """Declares a float64 output and answers float32: every answer would break the
    declaration, which the start-up probe finds on its row of zeros."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float64", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class _CrashesOnceAt70(Handler):
    """Exits (a crash: its request is re-queued) the first time a batch starts with
    70, once per ``options.marker`` file; else answers what ``infer`` made of its input."""

    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (4,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def crash_once(self, batch: torch.Tensor) -> None:
        marker = self.settings.options["marker"]
        if float(batch[0, 0]) == 70 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(99)


class ScalesInPreprocess(_CrashesOnceAt70):
    """Multiplies its input by 10 in place in ``preprocess``, as a normaliser might."""

    def preprocess(self, payload: np.ndarray, kind: object) -> torch.Tensor:
        t = torch.from_numpy(payload)
        t.mul_(10)
        return t

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        self.crash_once(batch)
        return batch.clone()


class ScalesInInfer(_CrashesOnceAt70):
    """Multiplies its batch by 10 in place in ``infer`` (an in-place first layer)."""

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        batch.mul_(10)
        self.crash_once(batch)
        return batch


class ScoresWithoutClasses(Handler):
    """Says classification, but answers one number per row: nothing to take a class of."""

    task = "classification"
    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", ()),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.sum(1)


class LabelsTooFew(ScoresWithoutClasses):
    """Four classes, three labels."""

    outputs = (TensorSpec("OUTPUT0", "float32", (4,)),)
    labels = ("a", "b", "c")

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class Chatty(Handler):
    """Identity that prints, as model code does: to stdout and to stderr."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device
        print("loading the chatty model")

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        print("batch of", batch.shape[0], "rows")
        print("careful: a warning", file=sys.stderr)
        return batch


class RecordsItsExit(Handler):
    """Identity whose atexit handler writes the count of frozen objects (``gc``) to the
    file ``options.record``: that a model's exit handlers run, and what the worker's
    exit left them."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        path = str(self.settings.options["record"])

        def record() -> None:
            with open(path, "w") as f:
                f.write(str(gc.get_freeze_count()))

        atexit.register(record)

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class TrainModeBatchNorm(Handler):
    """A BatchNorm left in training mode: each row's answer is normalised by the statistics
    of its whole batch, so it depends on its batchmates."""

    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (4,)),)

    def load(self, device: torch.device) -> None:
        self.device = device
        self.norm = torch.nn.BatchNorm1d(4).train()

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return self.norm(batch)


class TakesHalfASecondAndMore(Slow):
    """Identity that takes 0.6 s a batch, whatever its size or input."""

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(0.6)
        return batch


class ServesLargeBatchesFaster(Slow):
    """Identity that takes 30 ms + 10 ms a row per batch, but a batch of 8 rows 155 ms
    on zeros (the warm-up profile's input) and 90 ms on anything else: the profile
    chooses 4 and rates 8 within 10 % of it, and served, 8 does more rows/s. With
    ``RINGSERVE_TEST_8_SLOWER`` set, 160 ms on anything else: served, 8 does fewer (as
    on a host whose load changed since a server kept 8)."""

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        rows = batch.shape[0]
        seconds = 0.03 + 0.01 * rows
        if rows == 8:
            served = 0.16 if os.environ.get("RINGSERVE_TEST_8_SLOWER") else 0.09
            seconds = served if bool(batch.any()) else 0.155
        time.sleep(seconds)
        return batch


class PreprocessThread(Handler):
    """Takes images (their bytes are not decoded) and answers, per image, 1.0 if its
    preprocess ran on one of the worker's preprocess threads (0.0: on the worker's own)
    and its length in bytes (which tells the answers apart)."""

    accepts_images = True
    preprocess_thread_safe = True
    inputs = (TensorSpec("INPUT0", "float32", (2,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (2,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        if kind != PayloadKind.IMAGE:
            return super().preprocess(payload, kind)
        pooled = threading.current_thread().name.startswith("preprocess")
        return torch.tensor([[float(pooled), float(len(payload))]])

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class OverridesPreprocess(PreprocessThread):
    """A subclass whose own ``preprocess`` has not said it is thread-safe."""

    def preprocess(self, payload: np.ndarray, kind: PayloadKind) -> torch.Tensor:
        return super().preprocess(payload, kind)


class SeveralOutputs(Handler):
    """Three outputs per row: the row doubled, its sum as an integer, and the sum's sign
    as text (BYTES). ``infer`` answers a dict of tensors, which the base ``postprocess``
    turns into arrays; this one adds the text. A row starting with 99 answers without
    TOTAL (a broken contract), one starting with 98 adds an undeclared output."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (
        TensorSpec("DOUBLED", "float32", (-1,)),
        TensorSpec("TOTAL", "int64", (1,)),
        TensorSpec("SIGN", "bytes", (1,)),
    )

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"DOUBLED": batch * 2, "TOTAL": batch.sum(dim=1, keepdim=True).long()}

    def postprocess(self, output: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = super().postprocess(output)
        totals = out["TOTAL"][:, 0]
        signs = np.empty((len(totals), 1), dtype=object)
        signs[:, 0] = ["neg" if t < 0 else "pos" if t > 0 else "zero" for t in totals]
        out["SIGN"] = signs
        first = out["DOUBLED"][:, 0] if out["DOUBLED"].shape[1] else np.zeros(0)
        if (first == 198).any():
            del out["TOTAL"]
        if (first == 196).any():
            out["EXTRA"] = signs
        return out


class MaskedSum(Handler):
    """Two inputs, as a text model takes token ids and an attention mask: per row, the
    sum of the ids the mask keeps and how many it keeps. ``infer`` is given a dict of
    batched tensors by input name (the base ``preprocess`` makes one per request)."""

    inputs = (TensorSpec("IDS", "int64", (-1,)), TensorSpec("MASK", "int64", (-1,)))
    outputs = (TensorSpec("SUM", "int64", (1,)), TensorSpec("KEPT", "int64", (1,)))

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, mask = batch["IDS"], batch["MASK"]
        return {
            "SUM": (ids * mask).sum(dim=1, keepdim=True),
            "KEPT": mask.sum(dim=1, keepdim=True),
        }


class ScaledByTag(Handler):
    """A numeric input and a BYTES one: per row, the sum of VALUES times the length of
    TAG (its own ``preprocess`` turns the text into a number, as a BYTES input needs)."""

    inputs = (TensorSpec("VALUES", "float32", (-1,)), TensorSpec("TAG", "bytes", (1,)))
    outputs = (TensorSpec("OUT", "float32", (1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def preprocess(self, payload: dict[str, np.ndarray], kind: PayloadKind) -> dict:
        lengths = [[float(len(t))] for (t,) in payload["TAG"].tolist()]
        return {"VALUES": torch.from_numpy(payload["VALUES"]), "TAG": torch.tensor(lengths)}

    def infer(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["VALUES"].sum(dim=1, keepdim=True) * batch["TAG"]
