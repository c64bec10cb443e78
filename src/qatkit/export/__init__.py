"""Export: writing the quantized model as a QDQ ONNX file, and the rewrites of that file.

- :mod:`~qatkit.export.writer`: :func:`export_onnx`, the TorchScript export with the quantizers' Q/DQ symbolics;
- :mod:`~qatkit.export.int16`: 16-bit Q/DQ stand-ins become standard opset-21 nodes;
- :mod:`~qatkit.export.unsigned`: signed activation grids on the equivalent unsigned container (OpenVINO);
- :mod:`~qatkit.export.softmax`: an inner-axis float Softmax as reductions (ONNX Runtime's CPU);
- :mod:`~qatkit.export.initializers`: Constant nodes as initializers, where vendor compilers look for them;
- :mod:`~qatkit.export.graph`: reading a graph's constants, shared by the rewrites, verify and inspect.
"""
from __future__ import annotations

from .writer import OPSET, export_onnx

__all__ = ["OPSET", "export_onnx"]
