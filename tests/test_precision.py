"""The GPU path as far as a CPU can check it: half precision, bfloat16, and device placement.

On CUDA the networks run under float16 autocast (``runtime.autocast``); a CPU
can run the same autocast with ``torch.autocast("cpu", dtype=torch.float16)``,
which exercises the same dtype rules (what is computed in float16, what stays
in float32) though not the same kernels. Capsule squash and routing are where
float16 overflows (|s|² > 65504) used to turn into NaN. Tensors created
without the input's device would break on a GPU: the models also run on the
"meta" device, and a source check lists every tensor factory in models/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cryocaps import runtime
from cryocaps.models import create_model
from cryocaps.models.capsules import ConvCapsule3d, dynamic_routing, squash
from cryocaps.models.routing import fused_routing

MODELS_DIR = Path(__file__).resolve().parents[1] / "cryocaps" / "models"
# tensor factories that take a device; conversions of Python data (as_tensor) are not listed
FACTORIES = {
    "zeros", "ones", "full", "empty", "empty_strided", "arange", "linspace", "eye",
    "rand", "randn", "randint", "tensor",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor.float()).all())


def test_squash_of_long_half_precision_vectors_is_finite():
    # |s|² = 90000 and 1e8 overflow float16 (max 65504): squash must still give length < 1
    s = torch.tensor([[300.0, 0.0, 0.0], [0.0, 6000.0, 8000.0], [0.0, 0.0, 0.0]]).half()
    v = squash(s, dim=1)
    assert v.dtype == torch.float16 and _finite(v)
    lengths = v.float().norm(dim=1)
    assert torch.allclose(lengths, torch.tensor([1.0, 1.0, 0.0]), atol=1e-2)
    assert torch.all(lengths <= 1.0)
    assert torch.allclose(v[1].float(), torch.tensor([0.0, 0.6, 0.8]), atol=1e-3)


@pytest.mark.parametrize("implementation", ["fused", "plain"])
def test_routing_of_large_half_precision_votes_is_finite(implementation):
    # votes of length ~ 400: squared norms far beyond float16's range
    votes = (torch.randn(2, 4, 27, 8, 5) * 150).half().requires_grad_()  # (B, I, P, A, O)
    bias = torch.full((8, 5), 0.1, dtype=torch.float16, requires_grad=True)
    if implementation == "fused":
        capsules, coupling = fused_routing(votes, bias, 3)
    else:  # the plain routing takes (B, I, O, A, *S) votes and an (O, A) bias
        plain_votes = votes.permute(0, 1, 4, 3, 2)
        capsules, coupling = dynamic_routing(plain_votes, bias.t(), 3, return_coupling=True)
    assert _finite(capsules) and _finite(coupling)
    lengths = capsules.float().norm(dim=-1 if implementation == "fused" else 2)
    assert lengths.max() <= 1.0 + 1e-3  # below 1, up to float16 rounding
    capsules.float().sum().backward()
    assert _finite(votes.grad) and _finite(bias.grad)
    assert votes.grad.abs().sum() > 0


@pytest.mark.parametrize("fused", [True, False])
def test_capsule_layer_under_float16_autocast_is_finite_and_close_to_float32(fused):
    layer = ConvCapsule3d(8, 4, 16, 8, stride=2, routing_iterations=3, fused_routing=fused)
    assert layer.uses_fused_routing == fused
    capsules = torch.randn(1, 8, 4, 8, 8, 8)
    reference = layer(capsules)
    with torch.autocast("cpu", dtype=torch.float16):
        half = layer(capsules.requires_grad_())
        half.float().sum().backward()
    assert _finite(half) and _finite(capsules.grad) and _finite(layer.conv.weight.grad)
    assert (half.float() - reference).abs().max() < 3e-2  # float16 votes, sums of 4 x 27 terms


def _training_step(name: str, precision) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    """One loss + backward of a small model under a precision context."""
    model = create_model(name, 3)
    side = model.size_multiple * (2 if name == "unet" else 1)
    images = torch.randn(1, 1, side, side, side)
    labels = torch.randint(0, 3, (1, side, side, side))
    with precision:
        loss, parts = model.compute_loss(images, labels)
        loss.backward()
    return model, loss, parts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "ucaps"])
def test_training_step_under_float16_autocast_is_finite(name):
    # float16 convolutions on a CPU are slow: the smallest input each network takes
    model, loss, parts = _training_step(name, torch.autocast("cpu", dtype=torch.float16))
    assert _finite(loss) and all(map(lambda value: value == value, parts.values()))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(_finite(grad) for grad in grads)
    assert sum(float(grad.abs().sum()) for grad in grads) > 0


@pytest.mark.parametrize("name", ["unet", "ucaps"])
def test_training_step_under_bf16_autocast_is_finite(name):
    model, loss, _ = _training_step(name, runtime.autocast("cpu", bf16=True))
    grads = [p.grad for p in model.parameters()]
    assert _finite(loss) and all(grad is not None and _finite(grad) for grad in grads)


@pytest.mark.parametrize("name", ["unet", "ucaps"])
def test_models_run_forward_and_backward_on_the_meta_device(name):
    # a tensor made on the default device (CPU) would meet the meta tensors and fail
    model = create_model(name, 3).to("meta")
    images = torch.randn(2, 1, 16, 16, 16, device="meta")
    with torch.no_grad():
        assert model.eval()(images).device.type == "meta"
    outputs = model.train()(images, **({"auxiliary": True} if name == "ucaps" else {}))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert outputs[0].shape == (2, 3, 16, 16, 16)
    assert all(output.device.type == "meta" for output in outputs)
    sum(output.float().sum() for output in outputs).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def _factory_calls_without_device(path: Path) -> list[str]:
    """``torch.<factory>(...)`` calls without ``device=``, outside ``__init__`` (parameters)."""
    tree = ast.parse(path.read_text())
    missing = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if function.name == "__init__":
            continue  # parameters are made on the CPU and moved by Module.to
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in FACTORIES
                and not any(keyword.arg == "device" for keyword in node.keywords)
            ):
                missing.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    return missing


def test_every_tensor_factory_in_models_names_a_device():
    files = sorted(MODELS_DIR.glob("*.py"))
    assert len(files) >= 5
    missing = [call for path in files for call in _factory_calls_without_device(path)]
    assert missing == []


def test_the_factory_check_finds_a_missing_device(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import torch\n"
        "def f(x):\n"
        "    a = torch.zeros(3, device=x.device)\n"
        "    return torch.full((2,), 1.0) + a\n"
    )
    assert _factory_calls_without_device(sample) == ["sample.py:4 torch.full"]
