"""The weight path's C kernels (qatkit.quant.weight_kernel): the fake-quant output and the weight's gradient equal
the arithmetic they replace (qatkit.quant.fake_quant_math) bit for bit, edge values included; the BatchNorm
factor's gradient is at least as close to the exact sum as torch's float32 sum; the kept output tensor is written
again only when nothing holds it; the weight kernels compile once."""
import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

from qatkit.quant.fake_quant_math import (fake_quantize_grad, fake_quantize_math, weight_math, weight_scaled_grad,
                                          weight_scaled_math)
from qatkit.quant.kernels import _CAST_OVERFLOW_TO_MIN, KERNELS
from qatkit.quant.weight_kernel import ReusedOutput, fused_weight_fake_quant_into, fused_weight_grad


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _case(channels: int, k: int, qmin: int, qmax: int, symmetric: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w, f = torch.randn(1, channels, k, generator=g), torch.rand(channels, generator=g) + 0.5
    _, _, zp, _, _, inv = weight_scaled_math(w, f, qmin, qmax, symmetric, _CAST_OVERFLOW_TO_MIN)
    grad = torch.randn(1, channels, k, generator=g)
    return grad, w, f, inv.view(1, -1, 1), zp.view(1, -1, 1).to(torch.float32)


def _kernel():
    out = fused_weight_grad(*_case(4, 40, -127, 127, True, 0), -127, 127, _CAST_OVERFLOW_TO_MIN)
    if out is None:
        pytest.fail("the weight-gradient C kernel was not built on this machine (is gcc installed?)")


@pytest.mark.parametrize("channels,k", [(64, 576), (6, 17), (5, 8), (9, 3), (32, 4099)])
@pytest.mark.parametrize("qmin,qmax,symmetric", [(-127, 127, True), (-64, 63, True), (0, 255, False)])
def test_weight_gradient_bit_for_bit_and_factor_gradient_accurate(channels, k, qmin, qmax, symmetric):
    """Random weights plus NaN, +-inf, codes past 2**63, exact ties and NaN/-0.0 gradients (the vector loop and
    its scalar tail): the weight's gradient is the replaced arithmetic's bit for bit; the factor's gradient is
    within float32 rounding of the exact sum of the same products, and no further from it than torch's sum."""
    _kernel()
    grad, w, f, inv, zp = _case(channels, k, qmin, qmax, symmetric, channels * k)
    w[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])[:k]
    inv[0, 1] = 1e30  # every code of channel 1 overflows the int64 cast
    if k >= 4:  # exact ties at the folded weight: round half to even decides the mask at the grid's ends
        w[0, 2, :4] = torch.tensor([qmax + 0.5, qmin - 0.5, 2.5, -3.5]) / inv[0, 2, 0] / f[2]
    grad[0, -1, :2] = torch.tensor([float("nan"), -0.0])[:k]
    args = (grad, w, f, inv, zp, qmin, qmax, _CAST_OVERFLOW_TO_MIN)
    gw_ref, gf_torch = weight_scaled_grad(*args)
    gw, gf = fused_weight_grad(*args)
    assert torch.equal(_bits(gw), _bits(gw_ref))
    products = fake_quantize_grad(grad, w * f.view(1, -1, 1), inv, zp, qmin, qmax, _CAST_OVERFLOW_TO_MIN) * w
    exact, size = products.double().sum((0, 2)), products.double().abs().sum((0, 2))
    finite, empty = exact.isfinite() & (size > 0), size == 0  # (channel 1: every value masked)
    torch.testing.assert_close(gf[~exact.isfinite()], gf_torch[~exact.isfinite()], rtol=0, atol=0, equal_nan=True)
    assert empty.any() and torch.equal(gf[empty], exact[empty].float())
    err, err_torch = ((gf.double() - exact).abs() / size)[finite], ((gf_torch.double() - exact).abs() / size)[finite]
    assert err.max() <= max(float(err_torch.max()), 2 ** -23)


def test_thread_count_does_not_change_the_gradients():
    """A large weight gives the same gradients, bit for bit, whatever torch's thread count."""
    _kernel()
    args = (*_case(1024, 2304, -127, 127, True, 3), -127, 127, _CAST_OVERFLOW_TO_MIN)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_weight_grad(*args)
        torch.set_num_threads(3)
        three = fused_weight_grad(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(_bits(one[0]), _bits(three[0])) and torch.equal(_bits(one[1]), _bits(three[1]))


def test_turned_off_it_returns_none_and_training_uses_the_compiled_path(tmp_path):
    """QATKIT_FUSED_FAKE_QUANT=0: no C kernel (None); the quantizer's weight path still gives its gradients."""
    code = ("import torch\nfrom qatkit.quant.weight_kernel import fused_weight_grad\n"
            "t = torch.ones(1, 2, 8)\n"
            "print(fused_weight_grad(t, t, torch.ones(2), torch.ones(2), torch.zeros(2), -8, 7, True) is None)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QATKIT_CACHE_DIR": str(tmp_path), "QATKIT_FUSED_FAKE_QUANT": "0"})
    assert run.stdout.split() == ["True"], run.stderr[-2000:]


def test_the_weight_kernels_compile_once():
    """The weight path (range, qparams and fake-quant in one compiled kernel; the C backward) compiles once for
    every weight shape: its channel count is a specialisable size, so shapes of 0 or 1 channel stay out of it."""
    from qatkit.quant.quantizer import FakeQuantizer
    from qatkit.quant.scheme import QuantScheme

    KERNELS.ensure()
    if not KERNELS.compiled:
        pytest.fail("the fused fake-quant kernels did not compile on this machine (is g++ installed?)")
    scheme = QuantScheme(bits=8, signed=True, symmetric=True, per_channel=True, axis=0)
    g = torch.Generator().manual_seed(1)

    def step(shape):
        q = FakeQuantizer(scheme, "w", shape[0], dynamic=True)
        w, f = torch.randn(shape, generator=g).requires_grad_(), (torch.rand(shape[0], generator=g) + 0.5)
        f.requires_grad_()
        y = q.quantize_weight(w, f)
        y.sum().backward()
        return "WeightFakeQuant" in type(y.grad_fn).__name__ and w.grad is not None and f.grad is not None

    assert step((64, 32, 3, 3))
    with torch.compiler.set_stance("fail_on_recompile"):
        for shape in [(512, 512, 3, 3), (256, 256), (2, 9000), (17, 17, 9, 9), (1000, 1000), (9000, 2)]:
            assert step(shape), shape
    assert not step((1, 20000))  # one channel: the separate ops (a size of 1 would specialise)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("qmin,qmax,symmetric", [(-127, 127, True), (-8, 7, True), (0, 255, False)])
def test_forward_bit_for_bit(scaled, qmin, qmax, symmetric):
    """The C fake-quant pass (given the compiled range and qparams) gives fake_quantize_math's output bit for bit:
    random weights, NaN, +-inf, codes past 2**63, exact ties, values past the grid, codes at the zero point
    (+0.0), with and without a factor, on the vector loop and its tail (K = 4099)."""
    _kernel()
    g = torch.Generator().manual_seed(qmax)
    w, f = torch.randn(1, 24, 4099, generator=g), torch.rand(24, generator=g) + 0.5
    _, scale, zp, _, _, inv = (weight_scaled_math(w, f, qmin, qmax, symmetric, _CAST_OVERFLOW_TO_MIN) if scaled
                               else weight_math(w, qmin, qmax, symmetric, _CAST_OVERFLOW_TO_MIN))
    w[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    inv[1] = 1e30  # every code of channel 1 overflows
    fs = f[2] if scaled else 1.0
    w[0, 2, :6] = torch.tensor([qmax + 0.5, qmin - 0.5, 2.5, -3.5, 3 * qmax, 3 * qmin]) / inv[2] / fs
    zpf = zp.to(torch.float32)
    ref = fake_quantize_math(w * f.view(1, -1, 1) if scaled else w, inv.view(1, -1, 1), scale.view(1, -1, 1),
                             zpf.view(1, -1, 1), qmin, qmax, _CAST_OVERFLOW_TO_MIN)
    out = fused_weight_fake_quant_into(w, f if scaled else None, inv, scale, zpf, qmin, qmax, _CAST_OVERFLOW_TO_MIN,
                                       torch.empty_like(w))
    assert torch.equal(_bits(out), _bits(ref))
    assert (ref == 0).any() and not torch.signbit(ref[ref == 0]).any()  # +0.0 at the zero point, as PyTorch's


def test_kept_output_is_reused_only_when_free():
    """A training step writes the quantized weight into the tensor the quantizer kept, but never while an
    autograd graph still holds the previous one: two forwards before one backward get two tensors, and every
    gradient equals the separate ops'. A copy or a pickle of the quantizer does not carry the kept tensor."""
    _kernel()
    from qatkit.bn_fold import scale_weight
    from qatkit.quant.quantizer import FakeQuantizer
    from qatkit.quant.scheme import QuantScheme

    scheme = QuantScheme(bits=8, signed=True, symmetric=True, per_channel=True, axis=0)
    g = torch.Generator().manual_seed(4)
    q, plain = FakeQuantizer(scheme, "w", 64, dynamic=True), FakeQuantizer(scheme, "w", 64, dynamic=True)
    w, f = torch.randn(64, 32, 3, 3, generator=g).requires_grad_(), (torch.rand(64, generator=g) + 0.5)
    f.requires_grad_()
    x = torch.randn(2, 32, 8, 8, generator=g)

    def loss(y):
        return torch.nn.functional.conv2d(x, y).square().mean()

    loss(q.quantize_weight(w, f)).backward()
    kept = q._weight_out.tensor
    assert kept is not None
    w.grad = f.grad = None
    first, second = q.quantize_weight(w, f), q.quantize_weight(w, f)  # the first's graph still holds its tensor
    assert first.data_ptr() == kept.data_ptr() and second.data_ptr() != kept.data_ptr()
    (loss(first) + 2 * loss(second)).backward()
    ga, fa = w.grad.clone(), f.grad.clone()
    w.grad = f.grad = None
    y = plain(scale_weight(w, f))
    (loss(y) + 2 * loss(plain(scale_weight(w, f)))).backward()
    assert torch.equal(_bits(first), _bits(y)) and torch.equal(ga, w.grad)
    assert torch.allclose(fa, f.grad, rtol=1e-5, atol=1e-6)
    del first, second, y
    assert q.quantize_weight(w.detach(), f.detach()).data_ptr() == q._weight_out.tensor.data_ptr()  # free again
    assert copy.deepcopy(q)._weight_out.tensor is None
    assert pickle.loads(pickle.dumps(q))._weight_out.tensor is None
    reused = ReusedOutput()
    with reused.writing(torch.zeros(3)) as a, reused.writing(torch.zeros(3)) as b:  # (as from a second thread)
        assert a is reused.tensor and b is not a


def test_kept_output_follows_inference_mode():
    """A kept tensor made under torch.inference_mode is not reused by a training forward (autograd cannot save an
    inference tensor), nor a normal one under inference mode: the model trains after an inference-mode eval."""
    _kernel()
    from qatkit.quant.quantizer import FakeQuantizer
    from qatkit.quant.scheme import QuantScheme

    q = FakeQuantizer(QuantScheme(bits=8, signed=True, symmetric=True, per_channel=True, axis=0), "w", 64,
                      dynamic=True)
    w, f = torch.randn(64, 32, 3, 3).requires_grad_(), (torch.rand(64) + 0.5).requires_grad_()
    x = torch.randn(2, 32, 8, 8)
    with torch.inference_mode():
        assert q.quantize_weight(w, f).is_inference() and q._weight_out.tensor.is_inference()
    torch.nn.functional.conv2d(x, q.quantize_weight(w, f)).sum().backward()
    assert w.grad is not None and f.grad is not None and not q._weight_out.tensor.is_inference()
    with torch.inference_mode():
        assert q.quantize_weight(w, f).is_inference()
