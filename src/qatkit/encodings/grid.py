"""One encoding: an integer grid ``value = scale * k``, ``k`` in ``[offset, hi]``, and its AIMET JSON entry.

AIMET's "0.6.1" entry (what ``qnn-onnx-converter --quantization_overrides`` reads) is
``{"bitwidth", "dtype": "int", "is_symmetric": "True"/"False", "max", "min", "offset", "scale"}`` with
``offset = qmin - zero_point`` (AIMET describes every grid as unsigned: ``offset`` is minus the zero point of the
uint grid, so ``-2**(bits - 1)`` for a signed symmetric grid), ``min = scale * offset`` and
``max = scale * (qmax - zero_point)``. The ONNX container (int8 or uint8, ...) is not part of the format: a grid
is a set of real values, and :meth:`Grid.container` picks the container qatkit's own export would use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import QatkitError

ENCODINGS_VERSION = "0.6.1"
BIAS_BITS = 32  # int32 biases on the grid s_input * s_weight (what integer kernels add to the accumulator)
ENTRY_KEYS = ("bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale")
CONTAINERS = {np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max))
              for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32)}


class Container(NamedTuple):
    """How ONNX stores a grid: integer type, zero point, and the grid's codes ``[qmin, qmax]`` in that type."""

    dtype: np.dtype
    zero_point: int
    qmin: int
    qmax: int

    @property
    def full(self) -> bool:
        """True when the grid fills the type; otherwise QuantizeLinear needs a Clip before it."""
        return (self.qmin, self.qmax) == CONTAINERS[self.dtype]


@dataclass(frozen=True)
class Grid:
    """The real values ``scale * k`` for integers ``lo <= k <= hi`` (``lo`` is AIMET's ``offset``)."""

    scale: float  # a float32 value, held as a Python float (exact)
    lo: int  # qmin - zero_point
    hi: int  # qmax - zero_point
    bits: int
    symmetric: bool

    @classmethod
    def from_qdq(cls, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool) -> Grid:
        """The grid of a QuantizeLinear/DequantizeLinear with codes ``[qmin, qmax]`` in a (signed) container.

        The bit-width is the fewest bits holding ``qmax - qmin + 1`` levels (a narrow 8-bit grid, 255 levels, is
        8 bits). Symmetric means a signed container with zero point 0 (AIMET's ``offset = -2**(bits - 1)``).
        """
        return cls(float(np.float32(scale)), int(qmin) - int(zero_point), int(qmax) - int(zero_point),
                   max(2, int(qmax - qmin).bit_length()), bool(signed and int(zero_point) == 0))

    @classmethod
    def from_json(cls, entry: dict, name: str) -> Grid:
        """Read one AIMET entry; ``name`` (the tensor) goes into the error messages.

        Example:
            >>> Grid.from_json({"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": 2.55, "min": 0.0,
            ...                 "offset": 0, "scale": 0.01}, "x").container().dtype
            dtype('uint8')
        """
        missing = [k for k in ("bitwidth", "scale", "offset", "max") if k not in entry]
        if missing:
            raise QatkitError(f"encoding of {name!r} lacks {missing}: each entry needs {', '.join(ENTRY_KEYS)}")
        if str(entry.get("dtype", "int")) != "int":
            raise QatkitError(f"encoding of {name!r} has dtype {entry['dtype']!r}: only integer encodings "
                              "(dtype 'int') become QuantizeLinear/DequantizeLinear; drop the entry to keep it float")
        scale, bits = float(np.float32(entry["scale"])), int(entry["bitwidth"])
        if not (scale > 0 and np.isfinite(scale)):
            raise QatkitError(f"encoding of {name!r} has scale {entry['scale']!r}: it must be a positive number")
        lo, hi = int(entry["offset"]), int(round(float(entry["max"]) / scale))
        if not (2 <= bits <= BIAS_BITS and lo <= 0 <= hi and hi - lo < 2**bits):
            raise QatkitError(f"encoding of {name!r} is not a {bits}-bit grid containing zero (offset {lo}, "
                              f"max/scale {hi}): bitwidth must be 2..32 and max - min at most (2**bitwidth - 1) "
                              "* scale")
        symmetric = str(entry.get("is_symmetric", "False")).lower() == "true"
        return cls(scale, lo, hi, bits, symmetric)

    def to_json(self) -> dict:
        """The AIMET entry, keys in AIMET's order."""
        return {"bitwidth": self.bits, "dtype": "int", "is_symmetric": str(self.symmetric),
                "max": self.scale * self.hi, "min": self.scale * self.lo, "offset": self.lo, "scale": self.scale}

    def container(self) -> Container:
        """The ONNX type qatkit's export uses for this grid: int8/uint8 up to 8 bits, 16-bit types up to 16,
        int32 (no zero point) for 32-bit biases; signed when the grid is symmetric with negatives (zero point 0),
        unsigned otherwise (zero point ``-offset``). A signed affine grid thus comes back as the uint grid with
        the same real values."""
        width = 8 if self.bits <= 8 else 16 if self.bits <= 16 else 32
        signed = width == 32 or (self.symmetric and self.lo < 0)
        dtype = np.dtype(f"int{width}" if signed else f"uint{width}")
        zero_point = 0 if signed else -self.lo
        qmin, qmax = self.lo + zero_point, self.hi + zero_point
        lo_c, hi_c = CONTAINERS[dtype]
        if qmin < lo_c or qmax > hi_c:
            raise QatkitError(f"a {self.bits}-bit grid [{self.lo}, {self.hi}] does not fit {dtype} with zero point "
                              f"{zero_point}: check the encoding's offset and is_symmetric")
        return Container(dtype, zero_point, qmin, qmax)

    def clip_range(self) -> tuple[np.float32, np.float32]:
        """The real range of the grid as float32, computed as qatkit's export computes its Clip bounds."""
        return np.float32(float(self.lo) * self.scale), np.float32(float(self.hi) * self.scale)


def code_bits(codes: np.ndarray, signed: bool) -> int:
    """Fewest bits (at least 2) holding every integer code, in a signed or unsigned grid.

    Weights are calibrated per channel on their own min/max, so the largest code reaches the grid's end: the
    codes tell the bit-width of the quantizer that made them (7 for the onnxruntime recipe's 7-bit weights).
    """
    hi, lo = max(int(codes.max(initial=0)), 0), min(int(codes.min(initial=0)), -1)
    bits = max(hi.bit_length(), (-lo - 1).bit_length()) + 1 if signed else hi.bit_length()
    return max(bits, 2)
