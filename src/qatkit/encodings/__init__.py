"""Encodings export: a float ONNX model plus an AIMET-style ``.encodings`` JSON, for Qualcomm QNN/SNPE-style compilers.

Those converters (``qnn-onnx-converter --quantization_overrides``) take the float graph and one integer grid per
tensor instead of QuantizeLinear/DequantizeLinear nodes. qatkit writes its QDQ model as always
(:func:`qatkit.export_onnx`) and strips it (:mod:`.strip`): what reaches the compiler is what ``verify`` checked.
:func:`qdq_from_encodings` (:mod:`.rebuild`) puts the nodes back, which is how the pair is tested: the rebuilt
model computes in ONNX Runtime exactly what the QDQ export computes. See docs/targets.md.

Bit-widths are read from the QDQ graph, not from the model's quantizers, so any QDQ export can be stripped: an
activation's grid is its container's unless qatkit's export put a Clip before it (the Clip bounds are the grid's
ends); a weight's is the fewest bits holding its integer codes (weights are calibrated on their own per-channel
min/max, so the codes reach the grid's end). One consequence: a narrow-range weight grid (e.g. [-127, 127]) is
written as the full grid of its bit-width (min = -128 * scale); the weight values are exact either way.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

from ..errors import QatkitError
from ..export import export_onnx
from .grid import ENCODINGS_VERSION, Grid
from .rebuild import qdq_from_encodings, read_encodings
from .strip import strip_qdq

__all__ = ["export_encodings", "strip_qdq", "qdq_from_encodings", "read_encodings", "Grid", "ENCODINGS_VERSION"]


def export_encodings(model: nn.Module, example_inputs, path: str | Path, **export_options) -> tuple[Path, Path]:
    """Write a quantized model as a float ONNX model (``path``, no Q/DQ) plus its encodings beside it.

    Args:
        model: a model quantized by :func:`qatkit.quantize` and calibrated.
        example_inputs: a tensor or tuple of tensors, as for :func:`qatkit.export_onnx`.
        path: the float ONNX file, e.g. ``model.onnx``; the encodings go to ``model.encodings``.
        **export_options: passed on to :func:`qatkit.export_onnx` (``opset``, ``dynamic_batch``).

    Returns:
        ``(float_onnx_path, encodings_path)``.

    Raises:
        NotCalibratedError: a quantizer has no scale yet (run :func:`qatkit.calibrate` first).
        QatkitError: ``model`` was never quantized (there would be nothing to encode).

    Example:
        >>> qm = qatkit.quantize(model, "onnxruntime", (x,))                           # doctest: +SKIP
        >>> qatkit.calibrate(qm, batches)                                              # doctest: +SKIP
        >>> qatkit.export_encodings(qm, (x,), "out/model.onnx")                        # doctest: +SKIP
        (PosixPath('out/model.onnx'), PosixPath('out/model.encodings'))
    """
    if not hasattr(model, "_qatkit"):
        raise QatkitError(f"{type(model).__name__} has no quantizers, so there is nothing to encode: call "
                          "qatkit.quantize(model, recipe, example_inputs) and qatkit.calibrate first")
    with tempfile.TemporaryDirectory() as tmp:
        qdq = export_onnx(model, example_inputs, Path(tmp) / "model.qdq.onnx", **export_options)
        return strip_qdq(qdq, path)
