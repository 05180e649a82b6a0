"""A user-defined handler: the smallest complete example of the ``python:`` kind.

Any importable ``Handler`` subclass can be served; ringserve imports
``MODULE:CLASS`` inside each worker process. To serve this one::

    PYTHONPATH=examples ringserve serve --model double=python:user_handler:Scale2x

then, for example::

    curl -s localhost:8000/v2/models/double/infer -d \\
      '{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}'

A handler declares its tensors (``inputs``/``outputs``: per-row shapes, -1 = any size),
reads its options in ``__init__`` (an error there stops the start at once, exit 2,
as a bad setting does; one raised in ``load`` is retried as a failed load until
``server.startup_timeout_s``), loads its model in ``load`` (once per worker, on the
worker's device), and runs a whole batch in ``infer``. ``preprocess``/``postprocess``
have working defaults for tensors.
"""

from __future__ import annotations

import torch

from ringserve.gpu_worker.handlers import Handler, TensorSpec
from ringserve.ipc.config import ModelSettings


class Scale2x(Handler):
    """Multiplies a float32 vector of any length by ``options.factor`` (default 2)."""

    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)
    platform = "python"

    def __init__(self, settings: ModelSettings, arg: str = "") -> None:
        super().__init__(settings, arg)
        # Options are checked here, not in ``load``: ``factor = "abc"`` then stops the
        # start with exit 2 and the error, instead of being retried for minutes.
        self.factor = float(settings.options.get("factor", 2.0))

    def load(self, device: torch.device) -> None:
        # A real handler would build its model here and move it to ``device``.
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch * self.factor


class _TwoHeads(torch.nn.Module):
    """A shared trunk and two heads: what a model with several outputs looks like."""

    def __init__(self, width: int = 16, classes: int = 4, dims: int = 8) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU())
        self.scores = torch.nn.Linear(width, classes)
        self.embedding = torch.nn.Linear(width, dims)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {
            "SCORES": self.scores(h).softmax(dim=1),
            "EMBEDDING": torch.nn.functional.normalize(self.embedding(h), dim=1),
        }


class ScoresAndEmbedding(Handler):
    """Two outputs from one model run: class scores and a unit-length embedding of a
    float32 vector of 4 values. ``infer`` returns a dict of tensors by output name; the
    base ``postprocess`` turns each into a numpy array. Serve and ask for one output::

        PYTHONPATH=examples ringserve serve --model heads=python:user_handler:ScoresAndEmbedding
        curl -s localhost:8000/v2/models/heads/infer -d '{"inputs": [{"name": "INPUT0",
          "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
          "outputs": [{"name": "SCORES"}]}'
    """

    inputs = (TensorSpec("INPUT0", "float32", (4,)),)
    outputs = (
        TensorSpec("SCORES", "float32", (4,)),
        TensorSpec("EMBEDDING", "float32", (8,)),
    )
    platform = "python"
    takes_weights = False  # seeded random weights: an example, not a trained model

    def load(self, device: torch.device) -> None:
        torch.manual_seed(0)
        self.model = _TwoHeads().to(device).eval()
        self.device = device

    def infer(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(batch)


class MeanEmbedding(Handler):
    """Two inputs, as a text model takes them: token ids and an attention mask (int64,
    any length). Answers the mean of the kept tokens' embeddings. ``infer`` gets a dict
    of batched tensors by input name; requests batch together when their lengths match::

        PYTHONPATH=examples ringserve serve --model text=python:user_handler:MeanEmbedding
        curl -s localhost:8000/v1/models/text/predict \\
          -d '{"data": {"INPUT_IDS": [101, 7592, 102], "ATTENTION_MASK": [1, 1, 0]}}'
    """

    inputs = (
        TensorSpec("INPUT_IDS", "int64", (-1,)),
        TensorSpec("ATTENTION_MASK", "int64", (-1,)),
    )
    outputs = (TensorSpec("EMBEDDING", "float32", (8,)),)
    platform = "python"
    takes_weights = False  # seeded random weights: an example, not a trained model

    def load(self, device: torch.device) -> None:
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(30522, 8).to(device).eval()  # BERT's vocabulary
        self.device = device

    def infer(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["INPUT_IDS"].clamp(0, self.embedding.num_embeddings - 1)
        mask = batch["ATTENTION_MASK"].unsqueeze(-1).to(torch.float32)
        summed = (self.embedding(ids) * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1)
