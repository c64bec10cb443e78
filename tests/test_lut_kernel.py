"""The table lookup of a function of a fake-quantized input (qatkit.quant.lut_kernel), and the quantized SiLU's
forward through it (qatkit.quant.silu_kernel): the per-element kernel's output bit for bit, edge values included;
one table per set of grids."""
import os
import subprocess
import sys

import pytest
import torch

from qatkit.quant import silu_kernel
from qatkit.quant.fake_quant_math import codes
from qatkit.quant.kernels import KERNELS
from qatkit.quant.lut_kernel import lookup


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _edge_values(n: int, seed: int, spread: float) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * spread
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0])
    return x


@pytest.mark.parametrize("qmin,qmax,zp", [(0, 255, 3), (-128, 127, 0), (0, 15, 8)])
def test_lookup_reads_the_code_of_every_element(qmin, qmax, zp):
    """The code is fake_quantize_math's (round half to even, clamped, NaN to qmin): the table's value at it, on
    the vector loop and its tail, with values at half steps and past both ends of the grid."""
    x = _edge_values(1003, qmax, 40.0)
    inv = 0.37
    x[6:10] = torch.tensor([0.5, 1.5, -2.5, 3.5]) / inv  # at (or next to) half steps after the product
    table = torch.randn(qmax - qmin + 1, generator=torch.Generator().manual_seed(1))
    y = lookup(x, inv, float(zp), float(qmin), float(qmax), table)
    if y is None:
        pytest.fail("the lookup C kernel was not built on this machine (is gcc installed?)")
    q = codes(x, torch.tensor(inv), torch.tensor(float(zp)), False)
    c = torch.where(q >= qmin, q, qmin)
    c = torch.where(c <= qmax, c, qmax)
    assert torch.equal(_bits(y), _bits(table[(c - qmin).long()]))


@pytest.mark.parametrize("size", [70_001, 65_536, 200_003])
def test_quantized_silu_by_table_is_the_kernel_bit_for_bit(size):
    """The SiLU chain with its input quantizer (conv output -> fake-quant -> x * fq(sigmoid(x)) -> fake-quant)
    through the table equals the per-element compiled kernel on every element, for several grids."""
    KERNELS.ensure()
    for trial in range(4):
        x = _edge_values(size, trial, 0.5 + 2 * trial)
        inp = (torch.tensor(0.03 + 0.01 * trial), torch.tensor(100 + 7 * trial, dtype=torch.int32), 0, 255)
        sig = (torch.tensor(1 / 255), torch.tensor(0, dtype=torch.int32), 0, 255)
        out = (torch.tensor(0.02 + 0.003 * trial), torch.tensor(14 + trial, dtype=torch.int32), 0, 255)
        args = [a for g in (inp, sig, out) for a in silu_kernel._grid(g)]
        y = silu_kernel._by_table(x, args)
        assert y is not None
        assert torch.equal(_bits(y), _bits(KERNELS.run("silu_in_out_forward", x, *args)))


def test_one_table_per_set_of_grids():
    """The table is built once for a set of grids and again when a scale changes; below the size where it pays,
    the per-element kernel runs (None)."""
    KERNELS.ensure()
    silu_kernel._TABLES.clear()
    grids = [(torch.tensor(0.05), torch.tensor(120, dtype=torch.int32), 0, 255),
             (torch.tensor(1 / 255), torch.tensor(0, dtype=torch.int32), 0, 255),
             (torch.tensor(0.03), torch.tensor(9, dtype=torch.int32), 0, 255)]
    args = [a for g in grids for a in silu_kernel._grid(g)]
    x = _edge_values(silu_kernel.TABLE_MIN_NUMEL, 0, 3.0)
    first = silu_kernel._by_table(x, args)
    assert len(silu_kernel._TABLES) == 1 and torch.equal(_bits(silu_kernel._by_table(x, args)), _bits(first))
    assert len(silu_kernel._TABLES) == 1
    grids[2] = (torch.tensor(0.031), *grids[2][1:])
    args = [a for g in grids for a in silu_kernel._grid(g)]
    assert torch.equal(_bits(silu_kernel._by_table(x, args)), _bits(KERNELS.run("silu_in_out_forward", x, *args)))
    assert len(silu_kernel._TABLES) == 2
    assert silu_kernel._by_table(x[:1000], args) is None


def test_turned_off_the_lookup_returns_none(tmp_path):
    code = ("import torch\nfrom qatkit.quant.lut_kernel import lookup\n"
            "print(lookup(torch.zeros(8), 1.0, 0.0, 0.0, 3.0, torch.zeros(4)) is None)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QATKIT_CACHE_DIR": str(tmp_path), "QATKIT_FUSED_FAKE_QUANT": "0"})
    assert run.stdout.split() == ["True"], run.stderr[-2000:]
