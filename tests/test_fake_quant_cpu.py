"""The vectorized per-channel fake-quant (float32 CPU) equals PyTorch's kernel bit for bit, output and gradient."""
import pytest
import torch

from qatkit.quant.quantizer import _fake_quantize_per_channel_cpu

GRIDS = [(-128, 127), (0, 255), (-127, 127), (-32768, 32767), (0, 65535), (-8, 7), (0, 15)]


@pytest.mark.parametrize("qmin,qmax", GRIDS)
@pytest.mark.parametrize("ties", [False, True])
def test_matches_torch_kernel_bitwise(qmin, qmax, ties):
    g = torch.Generator().manual_seed(qmax + ties)
    for trial in range(20):
        c = int(torch.randint(1, 40, (), generator=g))
        shape = [c, *[int(v) for v in torch.randint(1, 5, (trial % 4,), generator=g)]]
        axis = trial % len(shape)
        n = shape[axis]
        scale = torch.rand(n, generator=g) * 0.1 + 1e-4
        bshape = [-1 if d == axis else 1 for d in range(len(shape))]
        if ties:  # exact half steps: round half to even must agree
            x = (torch.randint(-300, 300, shape, generator=g).float() + 0.5) * scale.reshape(bshape)
        else:
            x = torch.randn(shape, generator=g) * float(torch.rand((), generator=g) * 10)
        zp = torch.randint(qmin, qmax + 1, (n,), generator=g, dtype=torch.int32) if qmin >= 0 else \
            torch.randint(qmin // 2, qmax // 2 + 1, (n,), generator=g, dtype=torch.int32)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = torch.fake_quantize_per_channel_affine(xa, scale, zp, axis, qmin, qmax)
        yb = _fake_quantize_per_channel_cpu(xb, scale, zp, axis, qmin, qmax)
        grad = torch.randn(shape, generator=g)
        ya.backward(grad)
        yb.backward(grad)
        assert torch.equal(ya.view(torch.int32), yb.view(torch.int32))
        assert torch.equal(xa.grad.view(torch.int32), xb.grad.view(torch.int32))
