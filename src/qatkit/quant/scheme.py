"""What a quantizer does, as data: bits, sign, symmetry, granularity, calibrator."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CalibratorName = Literal["max", "ema", "percentile", "mse", "entropy"]


class QuantScheme(BaseModel):
    """One integer grid and how to find its range.

    ``bits`` may be below the container width (e.g. 7-bit weights stored as int8): the grid is then narrower
    than the int8/uint8 container ONNX carries, which is how ``reduce_range`` and W4A8 are expressed. Grids of 9 to
    16 bits live in int16/uint16 containers (QuantizeLinear from ONNX opset 21): the 16-bit activation regions
    NPUs keep for sensitive tensors (A16W8, docs/low_bit.md).

    Example::

        QuantScheme(bits=16, signed=False, symmetric=False)  # uint16 affine activations
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(8, ge=2, le=16)
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0
    narrow_range: bool = False
    calibrator: CalibratorName = "max"
    percentile: float = Field(99.99, gt=50.0, le=100.0)
    averaging_constant: float = Field(0.01, gt=0.0, le=1.0)
    # During training: "fixed" keeps the calibrated scale (seed 001), "ema" keeps updating it with a moving
    # average of each batch's min/max (seed 000), "learned" trains it by gradient (LSQ). Eval always uses it as is.
    scale_mode: Literal["fixed", "ema", "learned"] = "fixed"

    @model_validator(mode="after")
    def _per_channel_calibrator(self) -> "QuantScheme":
        if self.per_channel and self.calibrator not in ("max", "ema"):
            raise ValueError(
                f"per-channel quantization supports calibrator 'max' or 'ema', not '{self.calibrator}'"
            )
        return self

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def onnx_signed(self) -> bool:
        """Container type in ONNX: int8/int16 when the grid has negatives, else uint8/uint16."""
        return self.qmin < 0

    @property
    def container_bits(self) -> int:
        """Width of the ONNX integer type holding the codes: 8 up to 8-bit grids, 16 above."""
        return 8 if self.bits <= 8 else 16

    @property
    def container(self) -> str:
        """The numpy/ONNX integer type of the codes: ``int8``, ``uint8``, ``int16`` or ``uint16``."""
        return f"{'' if self.onnx_signed else 'u'}int{self.container_bits}"

    @property
    def container_range(self) -> tuple[int, int]:
        """(lowest, highest) code the container holds: what QuantizeLinear saturates to."""
        n = self.container_bits
        return (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if self.onnx_signed else (0, 2**n - 1)

    def calibrator_options(self) -> dict:
        if self.calibrator == "percentile":
            return {"percentile": self.percentile}
        if self.calibrator == "ema":
            return {"averaging_constant": self.averaging_constant}
        return {}

    def describe(self) -> str:
        sign = "int" if self.signed else "uint"
        kind = "sym" if self.symmetric else "affine"
        gran = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        return f"{sign}{self.bits} {kind} {gran} [{self.qmin},{self.qmax}] {self.calibrator}"
