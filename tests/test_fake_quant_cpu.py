"""The vectorized fake-quant (float32 CPU) equals PyTorch's kernels bit for bit: output and gradient, per tensor and
per channel, on 8- and 16-bit, signed and unsigned grids, with exact ties."""
import pytest
import torch

from qatkit.quant.kernels import _fake_quantize_cpu, _vectorizable
from qatkit.quant.quantizer import FakeQuantizer
from qatkit.quant.scheme import QuantScheme

GRIDS = [(-128, 127), (0, 255), (-127, 127), (-32768, 32767), (0, 65535), (-8, 7), (0, 15)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


@pytest.mark.parametrize("qmin,qmax", GRIDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_matches_torch_kernels_bitwise(qmin, qmax, ties, per_channel):
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _vectorizable(x, q.scale)
        assert torch.equal(_bits(q(x)), _bits(ref))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("per_channel", [False, True])
def test_non_finite_inputs_as_the_kernels(per_channel):
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
