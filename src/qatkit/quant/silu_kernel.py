"""The quantized SiLU of the ``onnxruntime`` recipe, ``x * fake_quant(sigmoid(x))``, fused for training on float32
CPU tensors: one compiled pass forward and one backward (:mod:`qatkit.quant.kernels` compiles the arithmetic of
:mod:`qatkit.quant.fake_quant_math`), with the SiLU output's quantizer and the quantizer of the conv output it reads
in the same pass. With that input quantizer, a large tensor's forward is a table of the pass's values on the input's
grid, read by each element's code (:mod:`qatkit.quant.lut_kernel`): the same output bit for bit.

Example:
    >>> y = quantized_silu(torch.randn(2, 8, 32, 32), torch.tensor(1 / 255), torch.tensor(0), 0, 255)
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .fake_quant_math import fake_quantize_math, grid_values
from .kernels import KERNELS, _vectorizable, first_order_only
from .lut_kernel import MAX_CODES, lookup

TABLE_MIN_NUMEL = 1 << 16  # below this the table's set-up (when its grids change) costs more than it saves
_TABLES: OrderedDict[tuple, torch.Tensor | None] = OrderedDict()  # by the grids' values; None: no exact table
_TABLES_KEPT = 1024


def _grid(q: tuple | None) -> tuple:
    """A per-tensor grid ``(scale, zero_point, qmin, qmax)`` as the kernels take it: ``(1/s, s, zp as float32,
    qmin, qmax)``."""
    scale = q[0].reshape(())
    return torch.reciprocal(scale), scale, q[1].reshape(()).to(torch.float32), q[2], q[3]


def _table(args: list, key: tuple) -> torch.Tensor | None:
    """The SiLU chain with its input quantizer (``silu_in_out``) at every code of that quantizer's grid, or None
    where a grid value would not be its own fake-quant (then a table would not be exact). Kept by ``key``, the
    grids' values: with fixed scales, QAT builds each SiLU's table once."""
    if key in _TABLES:
        _TABLES.move_to_end(key)
        return _TABLES[key]
    inv, scale, zp, qmin, qmax = args[:5]
    grid = grid_values(torch.arange(qmin, qmax + 1, dtype=torch.float32), scale, zp)  # the input's fake-quant values
    on_grid = torch.equal(fake_quantize_math(grid, inv, scale, zp, qmin, qmax, False).view(torch.int32),
                          grid.view(torch.int32))
    table = KERNELS.run("silu_in_out_forward", grid, *args) if on_grid else None
    _TABLES[key] = table
    if len(_TABLES) > _TABLES_KEPT:
        _TABLES.popitem(last=False)
    return table


def _by_table(flat: torch.Tensor, args: list) -> torch.Tensor | None:
    """``silu_in_out``'s forward on ``flat`` as a lookup of its input code (:mod:`qatkit.quant.lut_kernel`): the
    per-element kernel's output bit for bit; None where that does not apply."""
    qmin, qmax = args[3], args[4]
    if flat.numel() < TABLE_MIN_NUMEL or qmax - qmin + 1 > MAX_CODES:
        return None
    key = tuple(v.item() if isinstance(v, torch.Tensor) else v for v in args)  # (1/s, s, zp, qmin, qmax) x 3
    table = _table(args, key)
    if table is None:
        return None
    return lookup(flat, key[0], key[2], float(qmin), float(qmax), table)


class _QuantizedSiLU(torch.autograd.Function):
    """``x * fake_quant(sigmoid(x))`` in one pass forward and one backward (the separate ops make four tensors
    and read them back in backward); with ``out``, the SiLU output's quantizer in the same pass, and with ``inp``
    as well, the quantizer of the SiLU's input (``out`` and ``inp``: ``(scale, zero_point, qmin, qmax)``).
    Per-tensor grids, float32 CPU."""

    @staticmethod
    def forward(ctx, x, sig, out, inp):  # noqa: D401 - torch API
        flat = x.detach().reshape(-1).detach()
        grids = [g for g in (inp, sig, out) if g is not None]  # (inp is only given with out)
        args = [a for g in grids for a in _grid(g)]
        ctx.kind = ("silu", "silu_out", "silu_in_out")[len(grids) - 1]
        ctx.grids = args
        ctx.save_for_backward(flat)
        y = _by_table(flat, args) if ctx.kind == "silu_in_out" else None
        if y is None:
            y = KERNELS.run(f"{ctx.kind}_forward", flat, *args)
        return y.view(x.shape).detach()

    @staticmethod
    def backward(ctx, grad):
        first_order_only("quantized SiLU kernel")
        (flat,) = ctx.saved_tensors
        args = list(ctx.grids)
        if ctx.kind != "silu":
            del args[-4]  # the output quantizer's scale: its straight-through mask reads only 1/s
        dx = KERNELS.run(f"{ctx.kind}_backward", grad.reshape(-1).detach(), flat, *args)
        return dx.view(grad.shape), None, None, None


def quantized_silu(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   out: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
                   inp: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor | None:
    """``x * fake_quantize(sigmoid(x))`` fused, for training on float32 CPU tensors of 8192 elements or more; None
    elsewhere (the caller then runs the separate ops). Forward and gradient equal the separate ops' up to float32
    rounding (the compiled sigmoid may differ from PyTorch's by an ulp).

    Args:
        x: the SiLU's input.
        scale, zero_point, qmin, qmax: the sigmoid's per-tensor quantizer.
        out: the SiLU output's per-tensor quantizer as ``(scale, zero_point, qmin, qmax)``, applied in the same
            pass (one tensor fewer written and read back, forward and backward); None: the output stays float.
        inp: with ``out``, the per-tensor quantizer of ``x`` itself (``x`` is then the raw conv output), applied
            first in the same pass.

    Example:
        >>> y = quantized_silu(torch.randn(2, 8, 32, 32), torch.tensor(1 / 255), torch.tensor(0), 0, 255)
        >>> y = quantized_silu(torch.randn(2, 8, 32, 32), torch.tensor(1 / 255), torch.tensor(0), 0, 255,
        ...                    out=(torch.tensor(0.02), torch.tensor(14), 0, 255))
    """
    if (not _vectorizable(x, scale) or scale.numel() != 1 or torch.compiler.is_compiling()
            or any(g is not None and g[0].numel() != 1 for g in (out, inp)) or (inp is not None and out is None)):
        return None
    KERNELS.ensure()
    return _QuantizedSiLU.apply(x, (scale, zero_point, qmin, qmax), out, inp)
