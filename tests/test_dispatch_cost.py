"""What a QAT step costs where users train (a GPU), measured on the CPU without timing anything.

On a GPU every dispatched ATen op is a kernel launch and every ``.item()`` a host sync, so the step's cost is its op
count and its syncs, not the CPU's arithmetic. With ``QATKIT_FUSED_FAKE_QUANT=0`` the CPU runs what a GPU runs
(PyTorch's own fake-quant ops, no C kernels), and a ``TorchDispatchMode`` counts the ops. These tests assert:

* no host sync in a QAT step (``aten._local_scalar_dense`` is what ``.item()``, ``bool()`` and ``float()`` of a
  tensor dispatch to), eager, with the C kernels on and off, for fixed, EMA and dynamic ranges;
* every fake-quant a single PyTorch op with the kernels off (no rounding arithmetic spelled out in separate ops);
* ``torch.compile`` of a torchvision model (a root class not from ``torch.nn``) that does not recompile after its
  first train and eval steps.

``benchmarks/dispatch_cost.py`` reports the op counts and host times against float (docs/performance.md).
"""
from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch
import torchvision

import qatkit
from qatkit.analysis.dispatch_count import OpCounter
from qatkit.quant import kernels
from qatkit.quantize import quantization_state


@contextlib.contextmanager
def host_reads() -> Iterator[collections.Counter]:
    """Counts the Python-level reads of a tensor's values on the host (``.item()``, ``.tolist()``, ``.numpy()``,
    ``bool()``, ``float()``, ``int()``): what would each sync with a GPU. (A dispatch mode would see the ATen op they
    share, but torch.compile's kernels refuse to run under one: this works with the C kernels on.)"""
    reads: collections.Counter[str] = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            reads[name] += 1
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _resnet(recipe: str, size: int = 32) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    qatkit.quantize(model, recipe, (x,))
    qatkit.calibrate(model, [x])
    qatkit.freeze(model, bn=True)
    return model.train(), x


def _step(model: torch.nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _switch_kernels_off(monkeypatch) -> None:
    """What QATKIT_FUSED_FAKE_QUANT=0 at start-up does (what a GPU runs)."""
    monkeypatch.setenv("QATKIT_FUSED_FAKE_QUANT", "0")
    monkeypatch.setattr(kernels, "KERNELS", kernels._Kernels())
    assert kernels.KERNELS.off


@pytest.fixture(params=["kernels on", "kernels off"])
def kernel_switch(request, monkeypatch):
    """The C kernels as shipped, then switched off."""
    if request.param == "kernels off":
        _switch_kernels_off(monkeypatch)
    return request.param


@pytest.mark.parametrize("recipe", ["onnxruntime", "tensorrt", "npu-uint8"])
def test_a_qat_step_makes_no_host_sync(recipe, kernel_switch):
    """Forward, backward and optimizer step of a calibrated model read no tensor value on the host (npu-uint8:
    activation ranges that move by EMA every step; weights: ranges recomputed every step)."""
    model, x = _resnet(recipe)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _step(model, x, opt)  # the first step may compile kernels
    with host_reads() as reads:
        _step(model, x, opt)
    assert not reads, reads
    if kernel_switch == "kernels off":  # and none from C++ either: every value read dispatches this op
        with OpCounter() as counted:
            _step(model, x, opt)
        assert counted.ops["aten._local_scalar_dense"] == 0, counted.ops
        assert counted.ops["aten.convolution"] == 20  # the step ran the whole network


def test_the_host_read_counter_sees_a_read():
    """The instrument of the test above counts what it should (a quantizer read on the host does sync)."""
    with host_reads() as reads:
        assert bool(torch.ones(1)) and torch.ones(1).item() == 1.0
    assert reads == {"__bool__": 1, "item": 1}


def test_with_the_kernels_off_each_fake_quant_is_one_pytorch_op(monkeypatch):
    """What a GPU dispatches: one PyTorch fake-quant op per quantized tensor (resnet18's 20 conv weights and at
    least 20 activations under the tensorrt recipe, which keeps the biases float), and no rounding done in ops."""
    _switch_kernels_off(monkeypatch)
    model, x = _resnet("tensorrt")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    _step(model, x, opt)
    with OpCounter() as counted:
        _step(model, x, opt)
    fake_quant = {k: v for k, v in counted.ops.items() if "fake_quantize" in k}
    weights = sum(q.dynamic for q in quantization_state(model).quantizers.values())
    assert weights == 20
    assert fake_quant.get("aten.fake_quantize_per_channel_affine_cachemask") == weights, fake_quant
    assert fake_quant.get("aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams", 0) >= 20, fake_quant
    assert counted.ops["aten.round"] == 0 and counted.ops["aten.where"] == 0, counted.ops


@pytest.mark.parametrize("wrap_top_frame", [False, True])
def test_compiled_torchvision_model_does_not_recompile_after_warm_up(wrap_top_frame):
    """resnet18's class is torchvision's: by default torch.compile runs the root's hooks outside its graph (qatkit
    warns), with wrap_top_frame inside it. Either way, after one train step and one eval step, train steps and
    no-grad eval steps alternate with no recompile."""
    model, x = _resnet("onnxruntime", size=32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(wrap_top_frame=wrap_top_frame), warnings.catch_warnings():
            warnings.simplefilter("ignore", qatkit.QatkitWarning)
            compiled = torch.compile(model, backend="aot_eager")  # the guards are dynamo's, whatever the backend

            def train() -> None:
                model.train()
                compiled(x).square().mean().backward()
                opt.step()
                opt.zero_grad()

            def evaluate() -> None:
                model.eval()
                with torch.no_grad():
                    compiled(x)

            train()
            evaluate()
            with torch._dynamo.config.patch(error_on_recompile=True):
                for run in (train, train, evaluate, train, evaluate):
                    run()
    finally:
        torch._dynamo.reset()
