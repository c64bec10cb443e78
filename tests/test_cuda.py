"""qatkit on a CUDA GPU: the CPU's quantized arithmetic, QAT steps, torch.compile, and the export of a model trained
there. Skipped without a GPU (CI); scripts/gpu_check.sh runs it on a GPU machine.

Convolutions and matmuls run at IEEE fp32 in these tests (TF32 off, `ieee_fp32` fixture), so a comparison measures
qatkit's arithmetic on the two devices, not TF32's 10-bit mantissa. Tolerances, in steps of the quantizer of each
tensor:

* CUDA vs CPU, **qparams** (``max`` calibration): every scale within 0.1 % (an 8-bit step is 0.4 % of a range;
  calibration is a float forward, so the two devices' convolutions differ only in summation order, growing with
  depth; CPU proxy below: 1e-6), zero points within one.
* CUDA vs CPU, **layer-wise** (teacher-forced, as `qatkit.verify` compares ORT): every activation quantizer's integer
  codes on the GPU, computed from the CPU model's quantized inputs, within one code of the CPU's for >= 99.99 % of
  values. Two fp32 convolutions that sum in another order differ in the last bits, so a value next to a rounding
  boundary lands one code over (CPU proxy, the demo detector contiguous vs channels_last: 280 of 13.1 M values one
  code apart, none further); further only where a folded weight itself lands one code over (CUDA's rsqrtf is
  within 2 ulp) or a zero point moved, which the 0.01 % allows.
* CUDA vs CPU, **free-running** outputs: a deep quantized network amplifies those one-code flips (verify.py's
  docstring), so this is a gross-error bound only: mean difference <= 1 step (CPU proxy: 0.2-0.4).
* compiled vs eager on the GPU (small net, the same qparams): >= 99.9 % of outputs within one step, none beyond
  two; the loss within 1e-3 and each gradient within 5 % in norm (a flipped code moves its gradient contributions).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import qatkit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
ONE_STEP = 1 + 1e-4  # one step, with room for the rounding of the difference itself (as qatkit.verify)


def conv_bn_silu() -> nn.Module:
    """Conv-BN-SiLU twice and a 1x1 conv, with BN statistics and affine parameters away from their defaults."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.SiLU(), nn.Conv2d(16, 8, 1))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.1)
    return net.eval()


def demo() -> nn.Module:
    """The demo detector from its shipped float checkpoint."""
    from qatkit.apps.runconfig import DEMO_FLOAT
    from qatkit.apps.stages import load_float

    return load_float(DEMO_FLOAT)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {  # name -> (factory, batch shape)
    "conv_bn_silu": (conv_bn_silu, (4, 3, 32, 32)),
    "demo": (demo, (4, 3, 160, 160)),
}


@pytest.fixture(autouse=True)
def ieee_fp32() -> Iterator[None]:
    """Convolutions and matmuls at IEEE fp32 (cuDNN convolutions default to TF32), restored afterwards. Set with
    the legacy flags: after the new ``fp32_precision`` API, reading ``torch.backends.cudnn.allow_tf32`` (inductor's
    conv templates do) raises "a mix of the legacy and new APIs" in torch 2.14; the new API reads them fine."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def batches(name: str, n: int = 3) -> list[torch.Tensor]:
    """``n`` fixed random batches for model ``name``, drawn on the CPU (the same values for every device): the
    first two calibrate, the last is compared or trained on."""
    g = torch.Generator().manual_seed(0)
    return [torch.rand(*MODELS[name][1], generator=g) for _ in range(n)]


def calibrated(name: str, device: str, method: str | None = "max") -> tuple[nn.Module, torch.Tensor]:
    """Model ``name`` quantized (``onnxruntime`` recipe) and calibrated on ``device``; the batch to run it on.
    ``max`` calibration by default: the range of the data, so the two devices' scales differ only by float rounding
    (the recipe's ``mse`` search picks among discrete candidates: on the CPU proxy of the module docstring, some
    demo scales moved by up to 14 %)."""
    data = [b.to(device) for b in batches(name)]
    model = qatkit.quantize(MODELS[name][0]().to(device), "onnxruntime", (data[0][:1],))
    qatkit.calibrate(model, data[:2], method=method)
    return model, data[2]


def outputs(out) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, as float32 on the CPU."""
    return [t.detach().float().cpu() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_steps(model: nn.Module, reference: list[torch.Tensor]) -> list[float]:
    """The step of each output: its quantizer's scale, or (a float output) an 8-bit step of its range, as verify."""
    state = qatkit.quantization_state(model)
    keys = state.outputs + [None] * (len(reference) - len(state.outputs))
    return [float(state.q(k).scale.max()) if k else max(float(r.max() - r.min()), 1e-12) / 255
            for k, r in zip(keys, reference)]


def steps_apart(model: nn.Module, got: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
    """|got - ref| of every output value, in steps of its output, all outputs concatenated."""
    return torch.cat([((g - r).abs() / s).flatten() for g, r, s in zip(got, ref, output_steps(model, ref))])


@contextlib.contextmanager
def tapped(model: nn.Module, tap: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Every activation quantizer's output goes through ``tap(quantizer, output)`` (the hook verify uses)."""
    state = qatkit.quantization_state(model)
    state.tap = tap
    try:
        yield
    finally:
        state.tap = None


def codes(q: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The integer codes of quantizer ``q``'s output ``y`` (exact: ``y`` is on the grid), on the CPU."""
    return (torch.round(y / q.scale) + q.zero_point).cpu()


@torch.no_grad()
def teacher_forced_codes(ref: nn.Module, ref_x: torch.Tensor, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model`` run with each activation quantizer's output replaced by ``ref``'s for the same tensor, so each
    layer computes from the same inputs on both; returns by how many codes each of ``model``'s own outputs differed
    from ``ref``'s (each on its own grid), all quantizers concatenated."""
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    with tapped(ref, lambda q, y: recorded.append((y, codes(q, y))) or y):
        ref(ref_x)
    diffs: list[torch.Tensor] = []

    def force(q: nn.Module, y: torch.Tensor) -> torch.Tensor:
        r, r_codes = recorded[len(diffs)]
        diffs.append((codes(q, y) - r_codes).abs().flatten())
        return r.to(y.device)

    with tapped(model, force):
        model(x)
    assert len(diffs) == len(recorded) > 0
    return torch.cat(diffs)


def qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer's scale and zero point (weights' included), on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.endswith((".scale", ".zero_point"))}


def check_matches_cpu(name: str, device: str) -> None:
    """Model ``name`` quantized and calibrated on ``device`` and on the CPU: the same qparams (to float rounding),
    layer-wise within one step, free-running within the gross-error bound (module docstring)."""
    ref, ref_x = calibrated(name, "cpu")
    model, x = calibrated(name, device)
    with torch.no_grad():
        ref_out, out = outputs(ref(ref_x)), outputs(model(x))  # a forward also sets the weight quantizers' scales
    ours, theirs = qparams(model), qparams(ref)
    assert ours.keys() == theirs.keys() and ours
    for k, v in theirs.items():
        if k.endswith(".scale"):
            torch.testing.assert_close(ours[k], v, rtol=1e-3, atol=0, msg=k)
        else:
            assert (ours[k] - v).abs().max() <= 1, k  # a zero point next to .5 may round the other way
    forced = teacher_forced_codes(ref, ref_x, model, x)
    within = float((forced <= 1).float().mean())
    assert within >= 0.9999, f"layer-wise: {within:.6f} within one code, worst {float(forced.max()):.0f} codes"
    free = steps_apart(ref, out, ref_out)
    mean, worst = float(free.mean()), float(free.max())
    assert mean <= 1.0, f"free-running: mean {mean:.3f} steps, worst {worst:.1f}"


@pytest.mark.parametrize("name", list(MODELS))
def test_quantized_and_calibrated_on_cuda_matches_cpu(name: str) -> None:
    check_matches_cpu(name, DEVICE)


def loss_of(out) -> torch.Tensor:
    """Mean square of every output (the loss of benchmarks/step_time.py)."""
    return sum(t.float().square().mean() for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def qat_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 1e-3) -> None:
    """``steps`` AdamW steps on :func:`loss_of` in train mode, each with a finite loss and finite gradients."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        loss = loss_of(model(x))
        assert torch.isfinite(loss), f"step {step}: loss {float(loss)}"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(torch.isfinite(g).all() for g in grads.values()), f"step {step}: non-finite gradient"
        opt.step()


def check_qat_steps(name: str, device: str, bn_frozen: bool) -> None:
    """QAT steps on ``device`` train every conv, keep the model there and its qparams finite; frozen BN keeps its
    running statistics, live BN updates them."""
    model, x = calibrated(name, device)
    if bn_frozen:
        qatkit.freeze(model, bn=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [bn.running_mean.clone() for bn in bns]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    qat_steps(model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    unchanged = [c for c in convs if torch.equal(weights[f"{c}.weight"], model.get_submodule(c).weight.detach())]
    assert not unchanged, f"conv weights not trained: {unchanged}"
    assert all(p.device.type == device for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in qparams(model).values())
    moved = [not torch.equal(s, bn.running_mean) for s, bn in zip(stats, bns)]
    assert moved == [not bn_frozen] * len(bns), "frozen BN keeps its running statistics, live BN updates them"


@pytest.mark.parametrize("bn", ["frozen", "live"])
@pytest.mark.parametrize("name", list(MODELS))
def test_qat_steps_on_cuda(name: str, bn: str) -> None:
    check_qat_steps(name, DEVICE, bn_frozen=bn == "frozen")


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compile from scratch (no graphs cached by an earlier test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_compiled_matches_eager(device: str, mode: str) -> None:
    """``torch.compile`` of the quantized small net (BN frozen) against eager on ``device``, in ``mode``: outputs
    within one step; in train mode also the loss and every parameter's gradient."""
    model, x = calibrated("conv_bn_silu", device)
    qatkit.freeze(model, bn=True)  # compiled training needs BN frozen (tests/test_compile.py)
    getattr(model, mode)()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin)  # a root from torch.nn: qatkit's hooks trace into the graph
    with torch.set_grad_enabled(mode == "train"):
        eager_out, compiled_out = model(x), compiled(x)
    apart = steps_apart(model, outputs(compiled_out), outputs(eager_out))
    assert float((apart <= ONE_STEP).float().mean()) >= 0.999 and float(apart.max()) <= 2 * ONE_STEP, (
        f"{mode}: {float((apart <= ONE_STEP).float().mean()):.5f} within one step, worst {float(apart.max()):.2f}")
    if mode == "train":
        eager_loss, compiled_loss = loss_of(eager_out), loss_of(compiled_out)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-3, atol=0)
        eager_loss.backward()
        compiled_loss.backward()
        for (n, a), b in zip(model.named_parameters(), twin.parameters()):
            assert a.grad is not None and b.grad is not None, n
            assert float((a.grad - b.grad).norm()) <= 0.05 * float(a.grad.norm()) + 1e-12, n


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compiled_matches_eager_on_cuda(mode: str, fresh_dynamo: None) -> None:
    check_compiled_matches_eager(DEVICE, mode)


def check_export_of_trained_model(device: str, folder: Path) -> None:
    """The demo detector calibrated (recipe's mse) and QAT-trained on ``device``, exported from there: ONNX
    Runtime agrees with it (moved to the CPU) as tests/test_openvino.py requires of the demo."""
    model, x = calibrated("demo", device, method=None)  # the recipe's own calibrator (mse), on the device
    qat_steps(qatkit.freeze(model, bn=True), x, lr=1e-4)
    path = qatkit.export_onnx(model, (x[:1],), folder / "trained.onnx")  # exported from the device
    model.cpu()  # verify runs the PyTorch side on the CPU, beside the runtime
    report = qatkit.verify(model, path, [x.cpu()[:2], batches("demo")[0][:2]])
    assert report.within_one_step >= 0.999, report.worst_layers
    assert report.outputs_within_one_step >= 0.999 and report.max_steps <= 2, report
    assert report.tapped_outputs_identical


def test_cuda_trained_model_exports_and_verifies(tmp_path: Path) -> None:
    check_export_of_trained_model(DEVICE, tmp_path)


@pytest.mark.xfail(raises=RuntimeError, strict=False,
                   reason="qatkit.verify runs the model on its own device and compares with the runtime's CPU "
                          "tensors (verify.py, _verify and _Forcer): a CUDA model must be moved to the CPU first")
def test_verify_takes_a_cuda_model(tmp_path: Path) -> None:
    model, x = calibrated("conv_bn_silu", DEVICE)
    path = qatkit.export_onnx(model, (x[:1],), tmp_path / "small.onnx")
    assert qatkit.verify(model, path, [x]).within_one_step >= 0.999
