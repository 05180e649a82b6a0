"""Model handlers, run the way a worker runs them, on the CPU.

Each test goes create_handler → load → preprocess per request → torch.cat → infer →
postprocess, and checks describe() against the declared specs.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ringserve.gpu_worker.handlers import BadInput, Handler, TensorSpec, create_handler
from ringserve.gpu_worker.handlers.base import OutputContractError
from ringserve.gpu_worker.handlers.declaration import DeclarationError, check_declaration
from ringserve.gpu_worker.output_contract import check_output
from ringserve.ipc.config import ModelSettings
from ringserve.ipc.errors import ExitCode
from ringserve.ipc.layout import PayloadKind

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CPU = torch.device("cpu")
TENSOR, IMAGE = PayloadKind.TENSOR, PayloadKind.IMAGE


def loaded(handler: str, **kwargs: object) -> Handler:
    h = create_handler(ModelSettings(name="m", handler=handler, **kwargs))  # type: ignore[arg-type]
    h.load(CPU)
    return h


def run(h: Handler, *requests: tuple[np.ndarray, PayloadKind]) -> np.ndarray:
    """The worker's path for one batch made of ``requests``, with its output check."""
    batch = torch.cat([h.preprocess(payload, kind) for payload, kind in requests])
    out = h.postprocess(h.infer(batch.to(h.device)))
    return check_output(out, batch.shape[0], h.outputs[0] if h.output_declared else None)


def image_bytes(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def assert_describes(h: Handler) -> None:
    meta = h.describe()
    assert meta["inputs"] == [asdict(s) for s in h.inputs]
    assert meta["outputs"] == [asdict(s) for s in h.outputs]
    assert meta["labels"] == list(h.labels)
    assert meta["accepts_images"] == h.accepts_images
    assert meta["device"] == "cpu"


# -- digits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Handler:
    return loaded("digits")


def test_digits_describes_its_specs(digits: Handler) -> None:
    assert_describes(digits)
    meta = digits.describe()
    assert meta["inputs"] == [{"name": "INPUT0", "dtype": "float32", "shape": (8, 8)}]
    assert meta["outputs"] == [{"name": "OUTPUT0", "dtype": "float32", "shape": (10,)}]
    assert meta["task"] == "classification"
    assert meta["labels"] == [str(d) for d in range(10)]
    assert meta["accepts_images"] is True


def test_digits_json_sample_predicts_three(digits: Handler) -> None:
    data = np.asarray(json.loads((EXAMPLES / "digit_3.json").read_text())["data"], np.float32)
    assert data.shape in ((8, 8), (1, 8, 8))
    assert digits.preprocess(data, TENSOR).shape == (1, 8, 8)
    probs = run(digits, (data, TENSOR))
    assert probs.shape == (1, 10)
    assert probs.dtype == np.float32
    assert probs[0].argmax() == 3
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("label", [0, 3, 7])
def test_digits_png_sample_predicts_its_label(digits: Handler, label: int) -> None:
    payload = image_bytes(EXAMPLES / f"digit_{label}.png")
    x = digits.preprocess(payload, IMAGE)
    assert x.shape == (1, 8, 8)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 16.0
    assert run(digits, (payload, IMAGE))[0].argmax() == label


def test_digits_image_and_tensor_agree(digits: Handler) -> None:
    """The PNG is the JSON digit upscaled; decoding it gives back the raw values."""
    data = np.asarray(json.loads((EXAMPLES / "digit_3.json").read_text())["data"], np.float32)
    image = digits.preprocess(image_bytes(EXAMPLES / "digit_3.png"), IMAGE)
    np.testing.assert_allclose(image.numpy().reshape(8, 8), data.reshape(8, 8), atol=16 / 255)


def test_digits_mixed_batch_of_images_and_tensors(digits: Handler) -> None:
    data = np.asarray(json.loads((EXAMPLES / "digit_3.json").read_text())["data"], np.float32)
    rows = np.concatenate([data.reshape(1, 8, 8)] * 2)  # one request with two rows
    probs = run(
        digits,
        (image_bytes(EXAMPLES / "digit_0.png"), IMAGE),
        (rows, TENSOR),
        (image_bytes(EXAMPLES / "digit_7.png"), IMAGE),
    )
    assert probs.argmax(axis=1).tolist() == [0, 3, 3, 7]


def test_digits_reads_jpeg_and_rgb(digits: Handler) -> None:
    gray = np.asarray(Image.open(EXAMPLES / "digit_7.png").convert("L").resize((96, 96)))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert run(digits, (encode(rgb, "JPEG"), IMAGE))[0].argmax() == 7


def test_digits_accepts_read_only_payload(digits: Handler) -> None:
    data = np.zeros((2, 8, 8), np.float32)
    data.flags.writeable = False
    assert run(digits, (data, TENSOR)).shape == (2, 10)


@pytest.mark.parametrize(
    "payload",
    [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b""],
    ids=["garbage", "truncated-png", "empty"],
)
def test_digits_garbage_image_is_bad_input(digits: Handler, payload: bytes) -> None:
    with pytest.raises(BadInput, match="could not decode image"):
        digits.preprocess(np.frombuffer(payload, dtype=np.uint8), IMAGE)


def test_digits_refuses_image_over_pixel_limit() -> None:
    h = loaded("digits", options={"max_image_pixels": 1000})
    with pytest.raises(BadInput, match="too large"):
        h.preprocess(encode(np.zeros((40, 40), np.uint8), "PNG"), IMAGE)
    assert h.preprocess(encode(np.zeros((30, 30), np.uint8), "PNG"), IMAGE).shape == (1, 8, 8)


def test_digits_loads_weights_from_settings(digits: Handler, tmp_path: Path) -> None:
    from ringserve.gpu_worker.handlers.digits_net import DigitsNet

    torch.manual_seed(1)
    state = DigitsNet().state_dict()
    path = tmp_path / "digits.pt"
    torch.save(state, path)
    h = loaded("digits", weights=str(path))
    weight = "classifier.4.weight"
    assert torch.equal(h.model.state_dict()[weight], state[weight])
    assert not torch.equal(digits.model.state_dict()[weight], state[weight])  # packaged asset


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not a checkpoint at all\n", "is not a torch state_dict: Unsupported operand"),
        ("resnet", "does not fit DigitsNet: Error(s) in loading state_dict for DigitsNet"),
        ("tensor", "holds a Tensor, not a state_dict"),
    ],
    ids=["text", "another-model", "a-tensor"],
)
def test_a_weights_file_that_is_not_this_models_is_a_configuration_error(
    tmp_path: Path, content: object, says: str
) -> None:
    """A weights file that is there but is no checkpoint of this model cannot fix itself:
    WeightsError (the worker exits MODEL_CONFIG: the start stops at once; it was retried
    as model_load until the start-up timeout), saying what is wrong on one short line.
    torch's own message opened with advice to load with weights_only=False, which
    ringserve never does, and was cut off before the cause. A missing file stays an
    OSError, retried (storage may not be mounted yet)."""
    from ringserve.gpu_worker.handlers.weights import MAX_REASON, WeightsError

    path = tmp_path / "weights.pt"
    if content == "resnet":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(WeightsError) as caught:
        loaded("digits", weights=str(path))
    message = str(caught.value)
    assert says in message and str(path) in message, message
    assert "weights_only" not in message and "\n" not in message
    assert len(message) <= len(str(path)) + 60 + MAX_REASON
    with pytest.raises(FileNotFoundError):
        loaded("digits", weights=str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    ("handler", "options", "says"),
    [
        ("torchscript:/m.pt", {"input_shap": [4]}, "input_shap: not an option of torchscript "
         "(did you mean input_shape? it takes: input_dtype, input_shape"),
        ("torchvision:resnet18", {"num_clases": 5}, "num_clases: not an option of torchvision "
         "(did you mean num_classes?"),
        ("digits", {"labels_fle": "x"}, "labels_fle: not an option of digits "
         "(it takes: max_image_pixels)"),
        ("identity", {"factor": 2}, "factor: not an option of identity (it takes: none)"),
    ],
)  # fmt: skip
def test_an_option_a_built_in_handler_does_not_take_is_refused(
    handler: str, options: dict, says: str
) -> None:
    """A typo in ``[models.NAME.options]`` was ignored without a word: the model served
    with the default (a TorchScript model with any input shape, a 1000-class head), while
    every other unknown config key stops the start. It is a configuration error (the
    worker exits MODEL_CONFIG: exit 2 at start) naming the key and what is taken."""
    from ringserve.ipc.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        create_handler(ModelSettings(name="m", handler=handler, options=options))
    assert str(caught.value).startswith(f"models.m.options.{says}"), caught.value


def test_a_handler_of_yours_takes_any_option() -> None:
    h = create_handler(
        ModelSettings(
            name="m", handler="python:support.fake_handlers:Slow", options={"anything": 1}
        )
    )
    assert h.settings.options == {"anything": 1}


# -- torchvision -------------------------------------------------------------------------

SMALL = {"num_classes": 10, "image_size": 64}


@pytest.fixture(scope="module")
def resnet18() -> Handler:
    # No weights: the handler warns on the log and runs with random initialisation.
    torch.manual_seed(0)
    return loaded("torchvision:resnet18", options=SMALL)


def test_torchvision_describes_its_specs(resnet18: Handler) -> None:
    assert_describes(resnet18)
    assert resnet18.inputs[0].shape == (3, 64, 64)
    assert resnet18.outputs[0].shape == (10,)
    assert resnet18.task == "classification"


def test_torchvision_image_and_tensor_batch(resnet18: Handler) -> None:
    rng = np.random.default_rng(0)
    wide = encode(rng.integers(0, 256, (50, 120, 3), dtype=np.uint8), "JPEG")
    gray = encode(rng.integers(0, 256, (80, 60), dtype=np.uint8), "PNG")
    assert resnet18.preprocess(wide, IMAGE).shape == (1, 3, 64, 64)
    tensors = rng.standard_normal((2, 3, 64, 64), dtype=np.float32)
    probs = run(resnet18, (wide, IMAGE), (tensors, TENSOR), (gray, IMAGE))
    assert probs.shape == (4, 10)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_torchvision_normalises_like_imagenet(resnet18: Handler) -> None:
    """A flat colour comes out as ``(value / 255 - mean) / std`` per channel."""
    rgb = np.array([124, 116, 200], np.uint8)
    x = resnet18.preprocess(encode(np.broadcast_to(rgb, (70, 90, 3)).copy(), "PNG"), IMAGE)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    expected = (rgb / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    for channel in range(3):
        np.testing.assert_allclose(x[0, channel].numpy(), expected[channel], atol=1e-5)


def test_torchvision_preprocess_is_the_torchvision_recipe(resnet18: Handler) -> None:
    """The fused normalisation gives what resize, center_crop, to_dtype and normalize
    give, on a textured photo-sized image (not only a flat colour)."""
    import torchvision.transforms.v2.functional as F

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    x = resnet18.preprocess(encode(pixels, "PNG"), IMAGE).contiguous()
    ref = F.resize(torch.from_numpy(pixels).permute(2, 0, 1), [73], antialias=True)
    ref = F.to_dtype(F.center_crop(ref, [64, 64]), torch.float32, scale=True)
    ref = F.normalize(ref, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0], ref, atol=1e-5, rtol=1e-5)


def test_torchvision_runs_nhwc_on_a_cpu_unless_told_not_to(resnet18: Handler) -> None:
    """NHWC is oneDNN's faster layout for convolutions; the image path writes its input
    in that layout already, and ``channels_last = false`` keeps NCHW."""
    NHWC = torch.channels_last
    conv = resnet18.model.conv1.weight  # type: ignore[union-attr]
    assert conv.is_contiguous(memory_format=NHWC) and not conv.is_contiguous()
    image = encode(np.zeros((70, 90, 3), np.uint8), "PNG")
    assert resnet18.preprocess(image, IMAGE).is_contiguous(memory_format=NHWC)
    nchw = loaded("torchvision:resnet18", options={**SMALL, "channels_last": False})
    assert nchw.model.conv1.weight.is_contiguous()  # type: ignore[union-attr]
    assert nchw.preprocess(image, IMAGE).is_contiguous()
    x = torch.randn(2, 3, 64, 64)
    nchw.model.load_state_dict(resnet18.model.state_dict())  # type: ignore[union-attr]
    with torch.inference_mode():
        torch.testing.assert_close(resnet18.infer(x), nchw.infer(x), rtol=1e-4, atol=1e-5)


def test_decode_applies_exif_orientation_and_leaves_upright_images_alone() -> None:
    """A phone photo stored sideways (EXIF Orientation 6) decodes upright; the in-place
    transpose must not disturb an image that has no orientation tag."""
    from ringserve.gpu_worker.handlers.images import decode_payload

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :5] = 255  # a white mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=exif)
    upright = decode_payload(np.frombuffer(buf.getvalue(), np.uint8), "RGB")
    assert upright.shape == (3, 40, 20)  # height and width swapped
    assert upright[:, :5, -5:].min() == 255 and upright[:, -5:, :5].max() == 0
    plain = decode_payload(encode(pixels, "PNG"), "RGB")
    assert torch.equal(plain, torch.from_numpy(pixels).permute(2, 0, 1))


@pytest.mark.parametrize("label", [0, 3, 7])
def test_a_16_bit_grayscale_png_decodes_as_its_8_bit_original(digits: Handler, label: int) -> None:
    """A 16-bit grayscale PNG (mode I;16: scans, medical images) is scaled to 8 bits, for
    one channel and for three. PIL's own conversion clips every value over 255 of 65535
    to white: the same digit saved as 16 bits was answered 6 for 0, with a 200."""
    from ringserve.gpu_worker.handlers.images import decode_payload

    eight = np.asarray(Image.open(EXAMPLES / f"digit_{label}.png").convert("L"))
    buf = io.BytesIO()
    Image.fromarray(eight.astype(np.uint16) * 257).save(buf, "PNG")  # 0..255 -> 0..65535
    sixteen = np.frombuffer(buf.getvalue(), np.uint8)
    assert Image.open(io.BytesIO(buf.getvalue())).mode in ("I;16", "I")
    for mode in ("L", "RGB"):
        original = decode_payload(image_bytes(EXAMPLES / f"digit_{label}.png"), mode)
        assert torch.equal(decode_payload(sixteen, mode), original), mode
    assert run(digits, (sixteen, IMAGE))[0].argmax() == label


def test_torchvision_garbage_image_is_bad_input(resnet18: Handler) -> None:
    with pytest.raises(BadInput, match="could not decode image"):
        resnet18.preprocess(np.frombuffer(b"\xff\xd8\xff garbage", np.uint8), IMAGE)


def test_torchvision_refuses_a_banner_it_would_blow_up(resnet18: Handler) -> None:
    """The short side is resized up to the model's size before the crop: a 2000x1 PNG of
    91 bytes became a 3x73x146000 intermediate here (3x256x512000 at resnet50's sizes,
    375 MiB), bounded by nothing (the pixel limit counts the 2000 pixels sent). Past 64:1
    it is refused; at 64:1 it is served."""
    for shape in ((1, 2000), (2000, 1), (10, 641)):
        with pytest.raises(BadInput, match="more than 64 times as wide as high"):
            resnet18.preprocess(encode(np.zeros((*shape, 3), np.uint8), "PNG"), IMAGE)
    edge = resnet18.preprocess(encode(np.zeros((10, 640, 3), np.uint8), "PNG"), IMAGE)
    assert edge.shape == (1, 3, 64, 64)


def test_torchvision_without_weights_warns_on_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="ringserve.worker"):
        loaded("torchvision:resnet18", options=SMALL)
    assert "RANDOM" in caplog.text


def test_torchvision_without_weights_answers_alike_in_every_worker() -> None:
    """Random weights, but the same ones in each worker (and after each recycle), and the
    process's random state left as it was: `--workers 2` without weights answered one
    image differently depending on the worker that took it."""
    torch.manual_seed(1)
    a = loaded("torchvision:resnet18", options=SMALL)
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = loaded("torchvision:resnet18", options=SMALL)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_a)  # loading drew nothing from the caller's RNG
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(a.infer(x.clone()), b.infer(x.clone()))


def test_torchvision_loads_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class{i}\n" for i in range(10)))
    h = loaded(
        "torchvision:resnet18",
        weights=str(path),
        options={**SMALL, "labels_file": str(labels), "channels_last": True},
    )
    assert h.labels == tuple(f"class{i}" for i in range(10))
    assert h.describe()["labels"][9] == "class9"
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = reference(x).softmax(dim=1)
    torch.testing.assert_close(h.infer(x), expected, rtol=1e-4, atol=1e-5)


def _with_trained_batchnorms(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorms are the identity (mean 0, var 1, weight 1, bias 0): folding them
    would go unchecked. Statistics as after training make a wrong fold show."""
    gen = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.5, generator=gen)
    return model.eval()


def test_torchvision_folds_batchnorm_into_convolutions(tmp_path: Path) -> None:
    """Served with each BatchNorm folded into its convolution (one pass fewer per layer)
    and answering as the model built by torchvision does; ``fold_batchnorm = false``
    keeps the layers."""
    torch.manual_seed(5)
    reference = _with_trained_batchnorms(torchvision.models.resnet18(num_classes=10))
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = reference(x).softmax(dim=1)
    for fold, batchnorms in ((True, 0), (False, 20)):
        h = loaded(
            "torchvision:resnet18", weights=str(path), options={**SMALL, "fold_batchnorm": fold}
        )
        found = [m for m in h.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # type: ignore[union-attr]
        assert len(found) == batchnorms
        torch.testing.assert_close(h.infer(x), expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_stays_when_the_model_cannot_be_traced(caplog: pytest.LogCaptureFixture) -> None:
    """torch.fx cannot trace data-dependent control flow: such a model runs as built, and
    the log says why."""
    from ringserve.gpu_worker.handlers.vision import fold_batchnorm

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    model = _with_trained_batchnorms(Branchy())
    with caplog.at_level("WARNING", logger="ringserve.worker"):
        assert fold_batchnorm(model, "branchy") is model
    assert "model branchy: BatchNorm not folded" in caplog.text
    assert isinstance(model.bn, torch.nn.BatchNorm2d)


def test_torchvision_labels_must_match_classes(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 labels for 10 classes"):
        loaded("torchvision:resnet18", options={**SMALL, "labels_file": str(labels)})


# -- torchscript -------------------------------------------------------------------------


class _Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _script(module: torch.nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is", category=FutureWarning
        )
        torch.jit.script(module).save(str(path))


def test_a_skipped_profile_names_the_keys_that_avoid_it() -> None:
    """A TorchScript archive served without options is profiled on rows of 16 zeros, which
    a Linear(4, 3) refuses: the warning said "Declare the input shape the model takes"
    without saying where a TorchScript model declares it."""
    from ringserve.gpu_worker.process import profile_skipped_fix

    assert profile_skipped_fix("ts", "torchscript:/m.pt") == (
        "Declare models.ts.options.input_shape (a TorchScript archive declares none), "
        "or set models.ts.batching.preferred_batch_size, to avoid this"
    )
    mine = profile_skipped_fix("mine", "python:pkg.mod:Cls")
    assert "input_shape" not in mine and "models.mine.batching.preferred_batch_size" in mine


def test_torchscript_runs_a_scripted_module(tmp_path: Path) -> None:
    torch.manual_seed(4)
    module = _Affine().eval()
    path = tmp_path / "affine.pt"
    _script(module, path)
    h = loaded(
        f"torchscript:{path}",
        options={"input_shape": [4], "output_shape": [3]},
    )
    assert_describes(h)
    assert h.describe()["inputs"] == [{"name": "INPUT0", "dtype": "float32", "shape": (4,)}]
    assert h.describe()["outputs"] == [{"name": "OUTPUT0", "dtype": "float32", "shape": (3,)}]
    assert h.task == "tensor"
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((1, 4), np.float32)
    out = run(h, (a, TENSOR), (b, TENSOR))
    with torch.inference_mode():
        expected = module(torch.from_numpy(np.concatenate([a, b]))).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_torchscript_defaults_and_refusals(tmp_path: Path) -> None:
    h = create_handler(ModelSettings(name="m", handler="torchscript:/nowhere.pt"))
    assert h.inputs[0].shape == (-1,) and h.inputs[0].dtype == "float32"
    assert h.outputs[0].shape == (-1,) and h.task == "tensor"
    with pytest.raises(BadInput):
        h.preprocess(np.zeros(4, np.uint8), IMAGE)
    with pytest.raises(ValueError, match="input_dtype"):
        create_handler(
            ModelSettings(name="m", handler="torchscript:x", options={"input_dtype": "x"})
        )
    with pytest.raises(ValueError, match="task"):
        create_handler(ModelSettings(name="m", handler="torchscript:x", options={"task": "nope"}))


class _Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


def test_torchscript_returning_a_tuple_is_told_what_to_do(tmp_path: Path) -> None:
    """A TorchScript user cannot "define postprocess": the message says what can be
    done instead."""
    path = tmp_path / "pair.pt"
    _script(_Pair().eval(), path)
    with pytest.raises(
        OutputContractError, match=r"returned tuple; declare its outputs .* script a wrapper"
    ):
        run(loaded(f"torchscript:{path}"), (np.ones((1, 4), np.float32), TENSOR))


class _IdsAndMask(torch.nn.Module):
    """As a Triton pytorch_libtorch text model: two inputs by position, two outputs."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = ids * mask
        return kept.sum(dim=1, keepdim=True), mask.sum(dim=1, keepdim=True).to(torch.float32)


TWO_IN_TWO_OUT = {
    "inputs": [
        {"name": "INPUT__0", "dtype": "int64", "shape": [-1]},
        {"name": "INPUT__1", "dtype": "int64", "shape": [-1]},
    ],
    "outputs": [
        {"name": "OUTPUT__0", "dtype": "int64", "shape": [1]},
        {"name": "OUTPUT__1", "dtype": "float32", "shape": [1]},
    ],
}


def test_torchscript_takes_several_inputs_and_answers_several_outputs(tmp_path: Path) -> None:
    """Declared in options as Triton's config.pbtxt lists them: the inputs go to forward
    by position in the listed order, the returned tuple is checked output by output."""
    from ringserve.gpu_worker.batch_check import preprocessed
    from ringserve.gpu_worker.output_contract import check_outputs

    path = tmp_path / "text.pt"
    _script(_IdsAndMask().eval(), path)
    h = loaded(f"torchscript:{path}", options=TWO_IN_TWO_OUT)
    check_declaration(h)
    assert [s.name for s in h.inputs] == ["INPUT__0", "INPUT__1"] and h.output_declared
    ids, mask = np.array([[5, 6, 7], [1, 2, 3]]), np.array([[1, 1, 0], [1, 1, 1]])
    batch = preprocessed(h, {"INPUT__0": ids, "INPUT__1": mask})
    sums, kept = check_outputs(h.postprocess(h.infer(batch)), 2, h.outputs)
    assert sums.tolist() == [[11], [6]] and kept.tolist() == [[2.0], [3.0]]
    wrong = dict(
        TWO_IN_TWO_OUT, outputs=[{"name": "OUTPUT__0", "dtype": "int64", "shape": [1]}] * 3
    )
    wrong["outputs"] = [dict(o, name=f"O{i}") for i, o in enumerate(wrong["outputs"])]
    h = loaded(f"torchscript:{path}", options=wrong)
    with pytest.raises(
        OutputContractError, match="postprocess returned 2 outputs; the model declares 3"
    ):
        check_outputs(h.postprocess(h.infer(batch)), 2, h.outputs)


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"inputs": []}, "options.inputs: expected a list of tables"),
        ({"inputs": [{"dtype": "int64"}]}, r"options.inputs\[0\]: needs a name"),
        ({"outputs": [{"name": "A", "dims": [1]}]}, "unknown key 'dims'"),
        ({"inputs": [{"name": "A", "dtype": "fp32"}]}, "'fp32' is not a tensor dtype"),
        (dict(TWO_IN_TWO_OUT, input_shape=[3]), "options.inputs lists the inputs"),
    ],
)
def test_torchscript_tensor_lists_that_cannot_be_served_stop_the_start(
    tmp_path: Path, options: dict, why: str
) -> None:
    path = tmp_path / "text.pt"
    _script(_IdsAndMask().eval(), path)
    with pytest.raises(ValueError, match=why):
        create_handler(ModelSettings(name="m", handler=f"torchscript:{path}", options=options))


def test_torchscript_output_is_checked_only_when_declared(tmp_path: Path) -> None:
    """Without output options the spec is a placeholder, so a [N] output is served as
    the archive returns it; once declared, a mismatch is named."""
    path = tmp_path / "affine.pt"
    _script(_Affine().eval(), path)
    x = (np.ones((2, 4), np.float32), TENSOR)
    assert run(loaded(f"torchscript:{path}"), x).shape == (2, 3)
    h = loaded(f"torchscript:{path}", options={"output_shape": [4]})
    with pytest.raises(OutputContractError, match=r"per-row shape \[3\]; the model declares \[4\]"):
        run(h, x)


class _Argmax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, 2).argmax(dim=-1)


@pytest.mark.parametrize(
    ("options", "advertised"),
    [
        ({"input_shape": [6]}, TensorSpec("OUTPUT0", "int64", (3,))),
        ({}, TensorSpec("OUTPUT0", "int64", (-1,))),  # a variable input: a variable output
        ({"output_dtype": "int64"}, TensorSpec("OUTPUT0", "int64", (-1,))),  # as declared
    ],
)
def test_an_undeclared_torchscript_output_is_advertised_as_the_probe_finds_it(
    tmp_path: Path, options: dict, advertised: TensorSpec
) -> None:
    """Without output options, v2 metadata said FP32 [-1] whatever the archive returns;
    the start-up probe's row now tells the dtype, and the shape when the input's is
    fixed. Answers stay unchecked: the advertisement is a learned one."""
    path = tmp_path / "argmax.pt"
    _script(_Argmax().eval(), path)
    recorded: list[BaseException] = []
    worker = _probing_worker(loaded(f"torchscript:{path}", options=options), recorded)
    worker._probe_output()
    assert worker.handler.outputs == (advertised,) and not recorded
    assert worker.handler.describe()["outputs"][0]["dtype"] == "int64"


def test_an_undeclared_output_that_is_no_array_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "pair.pt"
    _script(_Pair().eval(), path)
    recorded: list[BaseException] = []
    worker = _probing_worker(loaded(f"torchscript:{path}"), recorded)
    with pytest.raises(SystemExit) as stopped:
        worker._probe_output()
    assert stopped.value.code == ExitCode.MODEL_CONFIG
    assert "returned tuple" in str(recorded[0])


# -- the output contract -----------------------------------------------------------------

FP32_3 = TensorSpec("OUT", "float32", (3,))


@pytest.mark.parametrize(
    ("result", "spec", "why"),
    [
        ((1, 2), FP32_3, "postprocess returned tuple; it must return a numpy array"),
        (["cat", "dog"], FP32_3, "returned list; .* declare the output dtype 'bytes'"),
        (np.array([["cat"] * 3] * 2), FP32_3, "is str96; .* set task = 'classification'"),
        (np.float32(1), FP32_3, "postprocess returned float32"),
        (np.array(1.0, np.float32), FP32_3, "handler returned a scalar for a batch of 2"),
        (np.zeros((3, 3), np.float32), FP32_3, "handler returned 3 rows for a batch of 2"),
        (np.zeros((2, 3)), FP32_3, "output OUT is float64; the model declares float32"),
        (np.zeros((2, 3), object), FP32_3, "output OUT is object; the model declares float32"),
        (np.zeros((2, 4), np.float32), FP32_3, r"per-row shape \[4\]; the model declares \[3\]"),
        (np.zeros(2, np.float32), FP32_3, r"per-row shape \[\]; the model declares \[3\]"),
        (
            np.zeros((2, 3, 1), np.float32),
            TensorSpec("OUT", "float32", (-1,)),
            r"per-row shape \[3, 1\]; the model declares \[-1\]",
        ),
        (
            np.zeros((2, 1), np.float32),
            TensorSpec("OUT", "bytes", (1,)),
            "output OUT is float32; the model declares bytes",
        ),
    ],
)
def test_an_output_that_breaks_its_declaration_is_named(
    result: object, spec: TensorSpec, why: str
) -> None:
    with pytest.raises(OutputContractError, match=why):
        check_output(result, 2, spec)


@pytest.mark.parametrize(
    ("result", "spec"),
    [
        (np.zeros((2, 3), np.float32), FP32_3),
        (np.zeros((2, 7, 5), np.int64), TensorSpec("OUT", "int64", (-1, 5))),
        (np.array([[b"a"], ["b"]], object), TensorSpec("OUT", "bytes", (1,))),
        (np.zeros((2, 9, 9), np.float64), None),  # nothing declared: type and rows only
    ],
)
def test_an_output_that_keeps_its_declaration_passes(result: np.ndarray, spec: TensorSpec) -> None:
    assert check_output(result, 2, spec) is result


def _probing_worker(handler: Handler, recorded: list[BaseException]) -> Any:
    """A worker for the start-up probe alone: no arena, no process."""
    from ringserve.gpu_worker.process import Worker

    worker = Worker.__new__(Worker)
    worker.handler = handler
    worker.model = SimpleNamespace(name="m", handler="h")
    worker.spec = SimpleNamespace(failures=0)
    worker.control = SimpleNamespace(record_error=recorded.append)
    worker._declared_output = handler.outputs[0] if handler.output_declared else None
    worker._several_outputs = tuple(handler.outputs) if len(handler.outputs) > 1 else None
    return worker


def test_a_model_with_several_outputs_that_breaks_them_stops_its_start() -> None:
    """The probe checks every declared output: one left out stops the start."""
    from support.fake_handlers import SeveralOutputs

    handler = SeveralOutputs(ModelSettings(name="m", handler="python:x"))
    handler.load(torch.device("cpu"))
    recorded: list[BaseException] = []
    worker = _probing_worker(handler, recorded)
    worker._probe_output()  # as declared: it starts
    assert not recorded
    handler.outputs = (*handler.outputs, TensorSpec("MORE", "float32", (1,)))
    worker = _probing_worker(handler, recorded)
    with pytest.raises(SystemExit) as stopped:
        worker._probe_output()
    assert stopped.value.code == ExitCode.MODEL_CONFIG
    assert [str(e) for e in recorded] == [
        "on a row of zeros: postprocess returned outputs that are not the declared "
        "DOUBLED, TOTAL, SIGN, MORE: missing MORE"
    ]


def test_a_worker_refuses_to_start_on_an_output_that_breaks_its_declaration() -> None:
    """The start-up probe runs one row of zeros through the handler: a model whose
    answers would all be 500s does not show ready, it stops the start (MODEL_CONFIG)
    with the mismatch recorded for ctl status and /v1/models."""
    recorded: list[BaseException] = []
    worker = _probing_worker(loaded("identity"), recorded)
    worker._declared_output = TensorSpec("OUTPUT0", "float64", (-1,))  # identity: float32
    with pytest.raises(SystemExit) as stopped:
        worker._probe_output()
    assert stopped.value.code == ExitCode.MODEL_CONFIG
    assert [str(e) for e in recorded] == [
        "on a row of zeros: output OUTPUT0 is float32; the model declares float64"
    ]
    worker._declared_output = TensorSpec("OUTPUT0", "float32", (-1,))
    worker._probe_output()  # a handler that keeps its declaration starts


def _declaring(inputs: object, outputs: object) -> Handler:
    h = loaded("identity")
    h.inputs, h.outputs = inputs, outputs  # type: ignore[assignment]
    return h


F32 = TensorSpec("X", "float32", (-1,))


@pytest.mark.parametrize(
    ("inputs", "outputs", "why"),
    [
        ((), (F32,), r"IdentityHandler.inputs declares 0: set inputs = \(TensorSpec"),
        ((F32, F32), (F32,), "IdentityHandler.inputs names 'X' more than once"),
        ((F32,), (F32, F32), "IdentityHandler.outputs names 'X' more than once"),
        ((F32,), (), r"IdentityHandler.outputs declares 0: .* up to 16 of them"),
        ((F32,), tuple(TensorSpec(f"Y{i}", "float32", (1,)) for i in range(17)), "declares 17"),
        ((F32,), (F32, TensorSpec("Z", "fp32", (1,))), "output Z: dtype 'fp32'"),
        ((F32,), None, "outputs declares NoneType"),
        (("X",), (F32,), "input must be a TensorSpec"),
        ((TensorSpec("", "float32", (1,)),), (F32,), "input needs a name"),
        ((TensorSpec("X", "fp32", (1,)),), (F32,), "input X: dtype 'fp32' is not one of bool"),
        ((F32,), (TensorSpec("Y", "float32", (None, 4)),), r"output Y: shape \(None, 4\)"),
        ((TensorSpec("X", "float32", (0,)),), (F32,), "positive integers, with -1"),
        ((TensorSpec("X", "float32", (1,) * 8),), (F32,), "8 per-row dimensions; .* at most 7"),
        ((F32,), (TensorSpec("Y", "float32", (2,) * 8),), "output Y: .* at most 7"),
    ],
)
def test_a_declaration_that_cannot_be_served_is_refused_at_load(
    inputs: object, outputs: object, why: str
) -> None:
    """Before, these loaded and then failed every request in the frontend (IndexError,
    "data type 'fp32' not understood") or crashed the worker (a None dimension); eight
    per-row dimensions, nine with the batch's, made every /predict request a 500 that
    kept its slot (the header holds eight)."""
    with pytest.raises(DeclarationError, match=why):
        check_declaration(_declaring(inputs, outputs))


def test_several_outputs_are_declared_with_distinct_names_and_no_classification() -> None:
    two = (F32, TensorSpec("Y", "int64", (1,)))
    check_declaration(_declaring((F32,), two))
    h = _declaring((F32,), two)
    h.task = "classification"
    with pytest.raises(DeclarationError, match="classification model, so it declares one output"):
        check_declaration(h)


def test_a_model_of_several_inputs_takes_no_images() -> None:
    h = _declaring((F32, TensorSpec("Y", "int64", (1,))), (F32,))
    check_declaration(h)
    h.accepts_images = True
    with pytest.raises(DeclarationError, match="takes images, so it declares one input"):
        check_declaration(h)


def test_several_outputs_are_answered_in_declared_order_or_refused_by_name() -> None:
    from ringserve.gpu_worker.output_contract import check_outputs

    specs = (TensorSpec("A", "float32", (2,)), TensorSpec("B", "int64", (1,)))
    a, b = np.zeros((3, 2), np.float32), np.ones((3, 1), np.int64)
    for result in ({"B": b, "A": a}, (a, b), [a, b]):
        got = check_outputs(result, 3, specs)
        assert type(got) is tuple and got[0] is a and got[1] is b
    refusals = [
        ({"A": a}, "not the declared A, B: missing B"),
        ({"A": a, "B": b, "C": b}, "not the declared A, B: undeclared C"),
        ({"A": a, "C": b}, "missing B, undeclared C"),
        ((a,), "postprocess returned 1 outputs; the model declares 2 (A, B)"),
        (a, "postprocess returned ndarray; a model that declares the outputs A, B returns a dict"),
        ({"A": a, "B": b.astype(np.int32)}, "output B is int32; the model declares int64"),
        ({"A": a[:2], "B": b}, "handler returned 2 rows for a batch of 3"),
    ]
    for result, why in refusals:
        with pytest.raises(OutputContractError, match=re.escape(why)):
            check_outputs(result, 3, specs)


def test_the_base_postprocess_converts_each_of_several_outputs() -> None:
    h = _declaring((F32,), (F32, TensorSpec("Y", "int64", (1,))))
    t, u = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    by_name = h.postprocess({"X": t, "Y": u})
    assert isinstance(by_name, dict) and by_name["Y"].dtype == np.int64
    in_order = h.postprocess((t, u))
    assert isinstance(in_order, tuple) and in_order[0].tolist() == [[1.0], [1.0]]
    with pytest.raises(OutputContractError, match="a dict of them by name"):
        h.postprocess({"X": t, "Y": "seven"})


@pytest.mark.parametrize(
    "handler", ["identity", "digits", "python:user_handler:Scale2x", "torchvision:resnet18"]
)
def test_built_in_declarations_pass(handler: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    options = SMALL if handler.startswith("torchvision") else {}
    check_declaration(loaded(handler, options=options))


def test_preprocess_must_return_a_tensor() -> None:
    from ringserve.gpu_worker.batch_inputs import as_inputs as _as_tensor

    t = torch.zeros(1)
    assert _as_tensor(t) is t
    assert _as_tensor(np.ones((1, 2), np.float32)).tolist() == [[1.0, 1.0]]
    for wrong in ([1.0], np.array([b"x"], object), None):
        with pytest.raises(OutputContractError, match=r"preprocess returned .*; it must return"):
            _as_tensor(wrong)


def test_a_slot_that_cannot_hold_one_row_is_an_error_with_its_cost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A [3, 512, 512] float32 input (3 MiB a row) in the default 1 MiB slot: every
    tensor request would be a 413, so this is an error, and the fix is sized for one row
    with what it takes of /dev/shm (slots x slot_bytes), not for max_batch_size rows
    (which would have asked for 24 GiB)."""
    from ringserve.gpu_worker.process import Worker

    worker = Worker.__new__(Worker)
    worker.handler = loaded("identity")
    worker.handler.inputs = (TensorSpec("INPUT0", "float32", (3, 512, 512)),)
    worker.model = SimpleNamespace(name="m", batching=SimpleNamespace(max_batch_size=32))
    worker.arena = SimpleNamespace(geometry=SimpleNamespace(slot_bytes=2**20, n_slots=256))
    with caplog.at_level("WARNING", "ringserve.worker"):
        worker._warn_if_slots_are_small()
    [record] = caplog.records
    assert record.levelname == "ERROR"
    assert record.getMessage() == (
        "model m: a request slot (arena.slot_bytes=1048576) holds not one row of INPUT0 "
        "(float32 [3, 512, 512], 3145728 bytes a row): every tensor request is refused "
        "(413). arena.slot_bytes=3145728 would hold 1; the arena then takes 768 MiB of "
        "/dev/shm (256 slots)"
    )


def test_default_postprocess_names_a_wrong_return_type() -> None:
    h = loaded("identity")
    with pytest.raises(OutputContractError, match="infer returned dict; it must return one"):
        h.postprocess({"logits": torch.zeros(1)})  # type: ignore[arg-type]
    array = np.zeros((1, 2), np.float32)
    assert h.postprocess(array) is array  # type: ignore[arg-type]


# -- python:module:Class -----------------------------------------------------------------


def test_the_example_with_several_outputs_answers_each_as_declared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ringserve.gpu_worker.output_contract import check_outputs

    monkeypatch.syspath_prepend(str(EXAMPLES))
    h = loaded("python:user_handler:ScoresAndEmbedding")
    check_declaration(h)
    batch = torch.rand(3, 4)
    scores, embedding = check_outputs(h.postprocess(h.infer(batch)), 3, h.outputs)
    assert scores.shape == (3, 4) and np.allclose(scores.sum(axis=1), 1, atol=1e-5)
    assert embedding.shape == (3, 8) and np.allclose(np.linalg.norm(embedding, axis=1), 1)


def test_the_example_with_several_inputs_keeps_only_the_masked_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ringserve.gpu_worker.batch_check import preprocessed
    from ringserve.gpu_worker.output_contract import check_output

    monkeypatch.syspath_prepend(str(EXAMPLES))
    h = loaded("python:user_handler:MeanEmbedding")
    check_declaration(h)
    ids = np.array([[101, 7592, 102], [101, 7592, 999]], np.int64)
    mask = np.array([[1, 1, 0], [1, 1, 0]], np.int64)
    batch = preprocessed(h, {"INPUT_IDS": ids, "ATTENTION_MASK": mask})
    out = check_output(h.postprocess(h.infer(batch)), 2, h.outputs[0])
    assert np.allclose(out[0], out[1])  # the masked-out token does not count
    assert not np.allclose(out[0], 0)


def test_python_user_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    h = loaded("python:user_handler:Scale2x")
    assert type(h).__name__ == "Scale2x"
    assert_describes(h)
    assert h.describe()["inputs"] == [{"name": "INPUT0", "dtype": "float32", "shape": (-1,)}]
    out = run(h, (np.array([[1.0, 2.0, 3.0]], np.float32), TENSOR))
    np.testing.assert_array_equal(out, [[2.0, 4.0, 6.0]])


def test_the_example_handler_refuses_a_bad_option_when_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """examples/user_handler.py read ``factor`` in ``load``: ``factor = "abc"`` was a
    failed load, retried until server.startup_timeout_s (180 s) and then blamed on a
    slow load. Read when the handler is created, it stops the start (exit 2)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    h = loaded("python:user_handler:Scale2x", options={"factor": 3})
    out = run(h, (np.array([[1.0, 2.0]], np.float32), TENSOR))
    np.testing.assert_array_equal(out, [[3.0, 6.0]])
    with pytest.raises(ValueError, match="could not convert string to float"):
        create_handler(
            ModelSettings(
                name="m", handler="python:user_handler:Scale2x", options={"factor": "abc"}
            )
        )


def test_python_handler_must_subclass_handler() -> None:
    with pytest.raises(TypeError, match="not a ringserve Handler"):
        create_handler(ModelSettings(name="m", handler="python:json:JSONDecoder"))


def test_bytes_input_needs_its_own_preprocess() -> None:
    """Refused once, when the handler is created, not on every request it gets."""
    fake = "python:support.fake_handlers"
    assert create_handler(ModelSettings(name="t", handler=f"{fake}:ByteLengths"))
    with pytest.raises(TypeError, match="its input is BYTES, so it must define preprocess"):
        create_handler(ModelSettings(name="t", handler=f"{fake}:BytesWithoutPreprocess"))


class _RaisesInside(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            raise ValueError("row is bad")
        return x


def test_a_torchscript_error_reaches_the_client_without_the_interpreter_traceback(
    tmp_path: Path,
) -> None:
    from ringserve.gpu_worker.process import _model_error

    _script(_RaisesInside(), tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        model = torch.jit.load(str(tmp_path / "m.pt"))
    with pytest.raises(Exception) as info:
        model(torch.ones(2))
    assert "Traceback" in str(info.value)  # what the log keeps
    told = _model_error(info.value).decode()
    assert "Traceback" not in told and str(tmp_path) not in told, told
    assert told.startswith("model error: ") and "row is bad" in told, told
    assert _model_error(ValueError("13 is unlucky")) == b"model error: 13 is unlucky"


def test_a_torchscript_directory_is_a_configuration_error(tmp_path: Path) -> None:
    """Refused when the handler is made (exit 2 at start), not retried as a load error."""
    with pytest.raises(ValueError, match="is a directory; name the archive file in it"):
        create_handler(ModelSettings(name="m", handler=f"torchscript:{tmp_path}"))


def test_a_classification_label_is_a_string_with_or_without_labels() -> None:
    """/predict's label was a string from a labels file and an integer without one (a
    torchvision model with no labels_file): a typed client broke on the second."""
    from types import SimpleNamespace

    from ringserve.frontend.app import _format_result

    scores = np.array([[0.1, 0.7, 0.2]], np.float32)
    for labels, label in (([], "1"), (["cat", "dog", "eel"], "dog")):
        info = SimpleNamespace(spec={"task": "classification", "labels": labels})
        row = _format_result(info, scores, batched=False)  # type: ignore[arg-type]
        assert row["label"] == label and row["index"] == 1, row


# -- a model that cannot load as configured stops the start, saying why --------------------


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not an archive at all\n", "failed reading zip archive"),
        (b"", "not a ZIP archive"),
        ("state_dict", "a torch.save checkpoint or state_dict?"),
    ],
    ids=["text", "empty", "a-state-dict"],
)
def test_a_torchscript_file_that_is_no_archive_is_a_configuration_error(
    tmp_path: Path, content: object, says: str
) -> None:
    """``torch.jit.load``'s RuntimeError for a file that is there was a load error,
    retried until ``server.startup_timeout_s`` (180 s) and then exit 3; it is a
    WeightsError now (the worker exits MODEL_CONFIG: exit 2 at once), on one line
    without torch's paragraph of guesses. A missing file stays retried."""
    from ringserve.gpu_worker.handlers.weights import WeightsError

    path = tmp_path / "model.pt"
    if content == "state_dict":
        torch.save(_Affine().state_dict(), path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(WeightsError) as caught:
        loaded(f"torchscript:{path}")
    message = str(caught.value)
    assert message.startswith(f"torchscript:{path} is not a TorchScript archive"), message
    assert says in message, message
    assert "miniz" not in message and "\n" not in message, message
    with pytest.raises(ValueError, match="does not exist") as missing:
        loaded(f"torchscript:{tmp_path / 'missing.pt'}")
    assert not isinstance(missing.value, WeightsError)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "EOFError (an empty or truncated file?)"),
        (0.5, "it is truncated or corrupt (reading it failed: Invalid argument)"),
        (0.999, "failed reading zip archive: failed finding central directory"),
        ("torchscript", "it is a TorchScript archive (torch.jit.save): serve it as torchscript:"),
    ],
    ids=["empty", "truncated-half", "truncated-end", "torchscript"],
)
def test_a_weights_file_is_refused_with_its_cause_not_torchs_advice(
    tmp_path: Path, content: object, says: str
) -> None:
    """An empty file said "is not a torch state_dict:" and nothing more; the digits
    weights cut in half raised torch's "OSError: Invalid argument", which was retried
    (as a file not there yet) until server.startup_timeout_s; one cut at its end ended
    in torch's "This is an internal miniz error. If you are seeing..." paragraph; a
    TorchScript archive got torch's advice to load with weights_only=False."""
    from ringserve.gpu_worker.handlers.digits_net import DigitsNet
    from ringserve.gpu_worker.handlers.weights import WeightsError

    path = tmp_path / "weights.pt"
    if isinstance(content, float):
        torch.save(DigitsNet().state_dict(), path)
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * content)])
    elif content == "torchscript":
        _script(_Affine(), path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(WeightsError) as caught:
        loaded("digits", weights=str(path))
    message = str(caught.value)
    assert says in message, message
    assert "miniz" not in message and "weights_only" not in message, message


class _NotATupleOfSpecs(Handler):
    inputs = TensorSpec("INPUT0", "float32", (-1,))  # type: ignore[assignment]
    outputs = (TensorSpec("OUTPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        self.device = device

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class _RawTuples(_NotATupleOfSpecs):
    inputs = (("INPUT0", "float32", (-1,)),)  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("cls", "says"),
    [
        (_NotATupleOfSpecs, r"_NotATupleOfSpecs.inputs declares TensorSpec: set inputs = \("),
        (_RawTuples, "input must be a TensorSpec"),
    ],
)
def test_a_declaration_of_another_form_is_named_not_a_typeerror(
    monkeypatch: pytest.MonkeyPatch, cls: type, says: str
) -> None:
    """``create_handler``'s BYTES check read ``inputs[0].dtype`` of whatever was there: a
    spec without its tuple failed "'TensorSpec' object is not subscriptable", a plain
    tuple "'tuple' object has no attribute 'dtype'". It leaves them to the declaration
    check after ``load``, which names the field and the form."""
    import sys
    import types

    module = types.ModuleType("_declared_elsewhere")
    setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    h = loaded(f"python:{module.__name__}:{cls.__name__}")
    with pytest.raises(DeclarationError, match=says):
        check_declaration(h)


def test_a_handler_module_that_exits_on_import_is_an_import_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SystemExit is no Exception: the worker died "error" (no cause named) and the start
    was retried until server.startup_timeout_s. It is an ImportError now: exit 2 at once,
    naming the module and its exit."""
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit('needs a licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"importing exits_on_import called sys\.exit\("):
        create_handler(ModelSettings(name="m", handler="python:exits_on_import:H"))


def test_a_stop_while_a_handler_module_imports_stays_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's SIGTERM handler raises StopRequested (a SystemExit) wherever the load
    is: turned into an ImportError, a stop during a slow import would read as a model
    that cannot load (exit 2), not the requested stop (exit 0)."""
    from ringserve.gpu_worker.stop import StopRequested

    (tmp_path / "stopped_on_import.py").write_text(
        "from ringserve.gpu_worker.stop import StopRequested\nraise StopRequested(0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(StopRequested) as stopped:
        create_handler(ModelSettings(name="m", handler="python:stopped_on_import:H"))
    assert stopped.value.code == 0


class _ExitsInLoad(Handler):
    inputs = (TensorSpec("INPUT0", "float32", (-1,)),)

    def load(self, device: torch.device) -> None:
        raise SystemExit(3)  # a library's sys.exit(3) on a setting it dislikes

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        return batch


class _StoppedInLoad(_ExitsInLoad):
    def load(self, device: torch.device) -> None:
        from ringserve.gpu_worker.stop import StopRequested

        raise StopRequested(ExitCode.OK)  # what the worker's SIGTERM handler raises


@pytest.mark.parametrize(
    ("cls", "code", "recorded"),
    [
        (_ExitsInLoad, ExitCode.MODEL_CONFIG, ["its load() called sys.exit(3)"]),
        (_StoppedInLoad, ExitCode.OK, []),
    ],
)
def test_a_handler_whose_load_exits_stops_the_start_but_a_stop_is_a_stop(
    monkeypatch: pytest.MonkeyPatch, cls: type, code: int, recorded: list[str]
) -> None:
    """A handler's load() calling sys.exit() ended the worker "exited: error", retried
    until server.startup_timeout_s with no cause named: it is a load that cannot work,
    MODEL_CONFIG (exit 2 at once) with the cause recorded. SIGTERM while loading stays
    the stop it is."""
    import sys
    import types

    from ringserve.gpu_worker.process import Worker

    module = types.ModuleType("_exits_in_load")
    setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    errors: list[BaseException] = []
    worker = Worker.__new__(Worker)
    worker.model = ModelSettings(name="m", handler=f"python:_exits_in_load:{cls.__name__}")
    worker.spec = SimpleNamespace(failures=1)  # (one log line, no traceback)
    worker.control = SimpleNamespace(record_error=errors.append)
    with pytest.raises(SystemExit) as stopped:
        worker._load_handler(torch.device("cpu"))
    assert stopped.value.code == code
    assert [str(e) for e in errors] == recorded


@pytest.mark.parametrize(
    ("handler", "options", "key"),
    [
        ("torchvision:resnet18", {"image_size": 0}, "image_size"),
        ("torchvision:resnet18", {"image_size": "224"}, "image_size"),
        ("torchvision:resnet18", {"num_classes": 2.5}, "num_classes"),
        ("torchvision:resnet18", {"num_classes": -1}, "num_classes"),
        ("torchvision:resnet18", {"max_image_pixels": 0}, "max_image_pixels"),
        ("torchvision:resnet18", {"channels_last": "false"}, "channels_last"),
        ("torchvision:resnet18", {"fold_batchnorm": "no"}, "fold_batchnorm"),
        ("digits", {"max_image_pixels": "lots"}, "max_image_pixels"),
        ("digits", {"max_image_pixels": -5}, "max_image_pixels"),
    ],
)
def test_a_bad_option_value_is_refused_at_start_naming_it(
    handler: str, options: dict, key: str
) -> None:
    """``int("224x")`` failed without the option's name; ``bool("false")`` is true (NHWC
    kept, BatchNorm folded); digits read ``max_image_pixels`` per image, so a bad value
    started fine and failed every image request with a 500."""
    from ringserve.ipc.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        create_handler(ModelSettings(name="m", handler=handler, options=options))
    assert str(caught.value).startswith(f"models.m.options.{key}: expected"), caught.value


@pytest.mark.parametrize("shape", [["3"], [2.5], [True], "4"])
def test_a_torchscript_shape_option_takes_integers_only(shape: object) -> None:
    """``int(2.5)`` made a shape of 2 without a word."""
    with pytest.raises(ValueError, match=r"options\.input_shape: expected a list of integers"):
        create_handler(
            ModelSettings(name="m", handler="torchscript:x", options={"input_shape": shape})
        )


@pytest.mark.parametrize(
    ("handler", "unused"),
    [("identity", True), ("torchscript:/nowhere.pt", True), ("digits", False)],
)
def test_a_weights_file_a_handler_does_not_read_is_said_to_be_unused(
    handler: str, unused: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--weights`` sets every model's weights; identity and a TorchScript archive read
    none, and served as if the file had been taken, without a word."""
    weights = tmp_path / "w.pt"
    with caplog.at_level(logging.WARNING, "ringserve.worker"):
        create_handler(ModelSettings(name="m", handler=handler, weights=str(weights)))
    said = [r.getMessage() for r in caplog.records if "is not used" in r.getMessage()]
    assert said == (
        [
            f"model m: {handler.partition(':')[0]} reads no weights file; weights = {weights} is not used"
        ]
        if unused
        else []
    )
