"""The fused fake-quant (float32 CPU; compiled by inductor, or its uncompiled fallback) equals PyTorch's kernels bit
for bit: output and gradient, per tensor and per channel, on 8- and 16-bit, signed and unsigned grids, with exact
ties; and the compiled kernels do not recompile for new shapes, ranks or grids."""
import warnings

import pytest
import torch

from qatkit.errors import QatkitWarning
from qatkit.quant import kernels
from qatkit.quant.kernels import KERNELS, _fake_quantize_cpu, _Kernels, _vectorizable
from qatkit.quant.quantizer import FakeQuantizer
from qatkit.quant.scheme import QuantScheme

GRIDS = [(-128, 127), (0, 255), (-127, 127), (-32768, 32767), (0, 65535), (-8, 7), (0, 15)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


@pytest.fixture(params=["compiled", "fallback"])
def path(request, monkeypatch):
    """Run a test with the compiled kernels, then with the uncompiled arithmetic they fall back to."""
    KERNELS.ensure()
    if request.param == "fallback":
        monkeypatch.setattr(kernels, "KERNELS", _Kernels.uncompiled())
    elif not KERNELS.compiled:
        pytest.fail("the fused fake-quant kernels did not compile on this machine (is g++ installed?)")
    return request.param


@pytest.mark.parametrize("qmin,qmax", GRIDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_torch_kernels_bitwise(qmin, qmax, ties, per_channel, path):
    g = torch.Generator().manual_seed(qmax + 2 * ties + per_channel)
    for trial in range(12):
        shape = [int(v) for v in torch.randint(1, 24, (1 + trial % 4,), generator=g)]
        axis = trial % len(shape) if per_channel else None
        n = shape[axis] if per_channel else 1
        scale = torch.rand(n, generator=g) * 0.1 + 1e-4
        zp = torch.randint(qmin, qmax + 1, (n,), generator=g, dtype=torch.int32) if qmin >= 0 else \
            torch.randint(qmin // 2, qmax // 2 + 1, (n,), generator=g, dtype=torch.int32)
        if not per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        bshape = [-1 if d == axis else 1 for d in range(len(shape))]
        if ties:  # exact half steps: round half to even must agree
            x = (torch.randint(-300, 300, shape, generator=g).float() + 0.5) * scale.reshape(bshape if per_channel
                                                                                                else ())
        else:
            x = torch.randn(shape, generator=g) * float(torch.rand((), generator=g) * 10)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        if per_channel:
            ya = torch.fake_quantize_per_channel_affine(xa, scale, zp, axis, qmin, qmax)
        else:
            ya = torch.fake_quantize_per_tensor_affine(xa, scale, zp, qmin, qmax)
        yb = _fake_quantize_cpu(xb, scale, zp, axis, qmin, qmax)
        grad = torch.randn(shape, generator=g)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(_bits(ya), _bits(yb))
        assert torch.equal(_bits(xa.grad), _bits(xb.grad))


def test_quantizer_takes_vectorized_path_on_large_tensors():
    """A FakeQuantizer on a tensor above the threshold gives PyTorch's kernel output, bit for bit."""
    q = FakeQuantizer(QuantScheme(), "act")
    q.set_range(torch.tensor(-1.0), torch.tensor(2.0))
    x = torch.randn(4, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.5
    ref = torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, q.scheme.qmin, q.scheme.qmax)
    assert _vectorizable(x, q.scale)
    assert torch.equal(_bits(q(x)), _bits(ref))


@pytest.mark.parametrize("per_channel", [False, True])
def test_non_finite_inputs_as_the_kernels(per_channel, path):
    """NaN and -inf map to qmin (the kernels' fmax ignores NaN), huge values as the kernels do, masks false."""
    x = torch.randn(4, 8, 16, 16)
    x[0, 0, 0, :5] = torch.tensor([float("nan"), float("-inf"), 1e30, -1e30, float("inf")])
    scale = torch.full((8,), 0.05) if per_channel else torch.tensor(0.05)
    zp = torch.full((8,), 3, dtype=torch.int32) if per_channel else torch.tensor(3, dtype=torch.int32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if per_channel:
        ya = torch.fake_quantize_per_channel_affine(xa, scale, zp, 1, 0, 255)
    else:
        ya = torch.fake_quantize_per_tensor_affine(xa, scale, zp, 0, 255)
    yb = _fake_quantize_cpu(xb, scale, zp, 1 if per_channel else None, 0, 255)
    assert torch.equal(_bits(ya), _bits(yb))
    grad = torch.randn_like(x)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(_bits(xa.grad), _bits(xb.grad))


def test_compiled_kernels_do_not_recompile():
    """Per tensor and per channel each compile once: later shapes, ranks, channel axes, grids, batch 1 and
    non-contiguous inputs reuse those kernels (a recompile here would raise)."""
    KERNELS.ensure()
    if not KERNELS.compiled:
        pytest.fail("the fused fake-quant kernels did not compile on this machine (is g++ installed?)")
    g = torch.Generator().manual_seed(0)

    def call(shape, axis, qmin, qmax, transpose=False):
        x = torch.randn(shape, generator=g)
        x = (x.transpose(0, -1) if transpose else x).requires_grad_()
        n = 1 if axis is None else x.shape[axis]
        scale = torch.rand(n, generator=g) * 0.1 + 1e-3
        zp = torch.zeros(n, dtype=torch.int32)
        if axis is None:
            scale, zp = scale.reshape(()), zp.reshape(())
        _fake_quantize_cpu(x, scale, zp, axis, qmin, qmax).sum().backward()

    call((2, 8, 32, 32), None, 0, 255)
    call((16, 8, 3, 3, 3), 0, -128, 127)
    call((4, 5, 30, 20), 1, -64, 63)  # the per-channel kernel for an inner dimension as well
    with torch.compiler.set_stance("fail_on_recompile"):
        for shape, axis, qmin, qmax in [((1, 16, 40, 40), None, -128, 127), ((9000,), None, 0, 15),
                                        ((4, 50, 60), None, -32768, 32767), ((128, 64), 0, -64, 63),
                                        ((64, 32, 3, 3), 0, -127, 127), ((2, 3, 40, 50, 2), 2, 0, 255),
                                        ((1, 8192), 1, -8, 7)]:
            call(shape, axis, qmin, qmax)
        call((4, 16, 32, 32), None, 0, 255, transpose=True)


def test_compile_failure_warns_and_stays_exact():
    """A kernel that cannot compile says so once, names the fix, and the arithmetic stays PyTorch's."""
    k = _Kernels()
    failed = r"compiled CPU fake-quant kernels failed \(RuntimeError: no compiler\).*g\+\+"
    with pytest.warns(QatkitWarning, match=failed):
        k.fail(RuntimeError("no compiler"))
    assert not k.compiled
    x = torch.randn(3, 9000)
    scale, zp = torch.tensor(0.02), torch.tensor(0.0)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127)
    assert torch.equal(k.forward(x, torch.reciprocal(scale), scale, zp, -128, 127, False), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k.fail(RuntimeError("again"))  # said once only


def test_traces_whole_under_torch_compile():
    """Inside torch.compile the fake-quant is plain ops: no graph break, eager's output, close gradients."""
    from qatkit.quant.kernels import fake_quantize

    def f(x, w, sw, zw):
        y = fake_quantize(torch.relu(x), torch.tensor(0.02), torch.tensor(3, dtype=torch.int32), 0, 255, None)
        return torch.nn.functional.conv2d(y, fake_quantize(w, sw, zw, -64, 63, 0))

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 8, 16, 16, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    sw, zw = torch.rand(4, generator=g) * 0.01 + 1e-3, torch.zeros(4, dtype=torch.int32)
    assert torch._dynamo.explain(f)(x, w, sw, zw).graph_break_count == 0
    xa, wa, xb, wb = (t.clone().requires_grad_() for t in (x, w, x, w))
    ya, yb = f(xa, wa, sw, zw), torch.compile(f)(xb, wb, sw, zw)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-4) and torch.allclose(wa.grad, wb.grad, rtol=1e-5)


def test_output_can_be_modified_in_place():
    """The model may add into a quantized tensor in place (torchvision's ``out += identity``); gradients stay exact."""
    x = torch.randn(2, 8, 40, 40, requires_grad=True)
    ref = x.detach().clone().requires_grad_()
    scale, zp = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    y = _fake_quantize_cpu(x, scale, zp, None, -128, 127)
    y += 1.0
    y.square().sum().backward()
    (torch.fake_quantize_per_tensor_affine(ref, scale, zp, -128, 127) + 1.0).square().sum().backward()
    assert torch.equal(x.grad, ref.grad)


def test_fused_silu_matches_separate_ops(path):
    """``x * fq(sigmoid(x))`` fused gives the separate ops' output and gradient (to float32 rounding)."""
    from qatkit.quant.silu_kernel import quantized_silu

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 16, 24, 24, generator=g) * 4).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    scale, zp = torch.tensor(1 / 255), torch.tensor(0, dtype=torch.int32)
    y = quantized_silu(x, scale, zp, 0, 255)
    y_ref = ref * torch.fake_quantize_per_tensor_affine(torch.sigmoid(ref), scale, zp, 0, 255)
    assert y is not None and torch.allclose(y, y_ref, rtol=1e-6, atol=1e-7)
    grad = torch.randn(x.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(x.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert quantized_silu(torch.randn(2, 8), scale, zp, 0, 255) is None  # small: the caller runs separate ops


@pytest.mark.parametrize("with_input", [False, True])
def test_fused_silu_with_its_quantizers_equals_the_separate_kernels(path, with_input):
    """The SiLU output's quantizer (and its input's) applied inside the fused SiLU kernel gives, bit for bit, the
    input's fake-quant, the fused SiLU and the output's fake-quant run one after the other (output and gradient),
    including values clipped at both ends of the output grid."""
    from qatkit.quant.kernels import fake_quantize
    from qatkit.quant.silu_kernel import quantized_silu

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 16, 24, 24, generator=g) * 4).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    sig = (torch.tensor(1 / 255), torch.tensor(0, dtype=torch.int32), 0, 255)
    out = (torch.tensor(0.02), torch.tensor(9, dtype=torch.int32), 0, 255)
    inp = (torch.tensor(0.04), torch.tensor(-3, dtype=torch.int32), -128, 127) if with_input else None
    y = quantized_silu(x, *sig, out=out, inp=inp)
    z = fake_quantize(ref, inp[0], inp[1], -128, 127, None) if with_input else ref
    y_ref = fake_quantize(quantized_silu(z, *sig), out[0], out[1], 0, 255, None)
    assert y is not None and torch.equal(y, y_ref)
    assert (y_ref.detach() == out[0] * (255 - 9)).any() and (y_ref.detach() == out[0] * (0 - 9)).any()  # both clips
    grad = torch.randn(x.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x.grad, ref.grad)
    assert not with_input or (x.detach().abs() > 5.2).any()  # some inputs beyond the input grid: its mask matters
    assert quantized_silu(torch.randn(2, 8), *sig, out=out, inp=inp) is None  # small: the caller runs separate ops


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("bits,symmetric", [(7, True), (8, False)])
def test_fused_weight_path_matches_separate_ops(bits, symmetric, folded):
    """A conv weight through the one-kernel weight path, with a BatchNorm factor folded in by the kernel or not:
    output, weight gradient and the quantizer's scale/zero point/range buffers equal the separate ops' (the fold
    as bn_fold.scale_weight, then the quantizer) bit for bit; the factor's gradient, a sum per channel, to float32
    rounding."""
    from qatkit.bn_fold import scale_weight
    from qatkit.quant.quantizer import FakeQuantizer
    from qatkit.quant.scheme import QuantScheme

    scheme = QuantScheme(bits=bits, signed=True, symmetric=symmetric, per_channel=True, axis=0)
    g = torch.Generator().manual_seed(bits)
    w, f = torch.randn(64, 32, 3, 3, generator=g), torch.rand(64, generator=g) + 0.5
    w[3] = 0.0  # a dead channel: scale 1.0
    fused_q, plain_q = (FakeQuantizer(scheme, "w", 64, dynamic=True) for _ in range(2))
    wa, fa, wb, fb = (t.clone().requires_grad_() for t in (w, f, w, f))
    if folded:
        ya = fused_q.quantize_weight(wa, fa)
        yb = plain_q(scale_weight(wb, fb))
    else:
        ya = fused_q.quantize_weight(wa * fa.reshape(-1, 1, 1, 1))  # folded by the caller
        yb = plain_q(wb * fb.reshape(-1, 1, 1, 1))
    assert ya.grad_fn is not None and "WeightFakeQuant" in type(ya.grad_fn).__name__  # the fused path ran
    grad = torch.randn(ya.shape, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(_bits(ya), _bits(yb))
    assert torch.equal(wa.grad, wb.grad)
    assert torch.allclose(fa.grad, fb.grad, rtol=1e-5, atol=1e-6) and (folded or torch.equal(fa.grad, fb.grad))
    for name in ("scale", "zero_point", "range_lo", "range_hi"):
        assert torch.equal(getattr(fused_q, name), getattr(plain_q, name)), name


def test_inference_mode_and_channels_last():
    """Inference tensors (their own compiled variant) and channels-last inputs give PyTorch's output."""
    g = torch.Generator().manual_seed(5)
    scale, zp = torch.tensor(0.02), torch.tensor(3, dtype=torch.int32)
    with torch.inference_mode():
        x = torch.randn(4, 16, 32, 32, generator=g)
        assert torch.equal(_fake_quantize_cpu(x, scale, zp, None, 0, 255),
                           torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255))
    x = torch.randn(4, 16, 32, 32, generator=g).to(memory_format=torch.channels_last)
    assert torch.equal(_fake_quantize_cpu(x, scale, zp, None, 0, 255),
                       torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255))


@pytest.mark.parametrize("value", ["false", "off", ""])
def test_unknown_switch_value_is_an_error(value, monkeypatch):
    """QATKIT_FUSED_FAKE_QUANT takes 0 or 1; anything else is refused, not read as "on"."""
    from qatkit.errors import QatkitError

    monkeypatch.setenv("QATKIT_FUSED_FAKE_QUANT", value)
    with pytest.raises(QatkitError, match="set it to 1 .* or 0"):
        _Kernels().ensure()
    monkeypatch.setenv("QATKIT_FUSED_FAKE_QUANT", "0")
    k = _Kernels()
    k.ensure()
    assert not k.compiled


def test_second_order_gradients_through_the_fused_kernels_raise():
    """create_graph=True through a fused CPU kernel says it is unsupported (its backward runs outside autograd)
    instead of leaving the second-order terms silently out; first-order gradients are unaffected."""
    from qatkit.errors import QatkitError
    from qatkit.quant.quantizer import FakeQuantizer
    from qatkit.quant.scheme import QuantScheme

    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    y = _fake_quantize_cpu(x, torch.tensor(0.05), torch.tensor(3, dtype=torch.int32), None, 0, 255)
    with pytest.raises(QatkitError, match="create_graph"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    q = FakeQuantizer(QuantScheme(bits=8, signed=True, symmetric=True, per_channel=True, axis=0), "w", 64,
                      dynamic=True)
    w = torch.randn(64, 32, 3, 3, requires_grad=True)
    with pytest.raises(QatkitError, match="create_graph"):
        torch.autograd.grad(q.quantize_weight(w, torch.rand(64) + 0.5).square().sum(), w, create_graph=True)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert g.shape == x.shape
