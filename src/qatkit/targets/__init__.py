"""Targets: where an exported model runs. Each is one module with a :class:`Runtime` (ONNX Runtime, OpenVINO)
registered in ``RUNTIMES``; :func:`open_runtime` opens a file on one by name, and :func:`qatkit.verify` is written
once against that contract, so a new toolchain is one module here.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import QatkitError
from .base import Predictor, Runtime
from .openvino import OpenVino
from .ort import OnnxRuntime

__all__ = ["Predictor", "Runtime", "RUNTIMES", "open_runtime", "OnnxRuntime", "OpenVino"]

RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (OnnxRuntime, OpenVino)}


def open_runtime(path: str | Path, runtime: str = "onnxruntime", *, threads: int | None = None,
                 precision: str = "f32") -> Runtime:
    """Open the ONNX model at ``path`` on a CPU inference runtime.

    Args:
        path: an ONNX file (``qatkit.export_onnx`` writes one).
        runtime: ``"onnxruntime"`` or ``"openvino"`` (the keys of ``RUNTIMES``).
        threads: intra-op threads (ORT) / inference threads (OpenVINO); ``None``: the runtime's default.
        precision: float precision for the parts of the graph that are not integer: ``"f32"`` (the default, and the
            only one ONNX Runtime's CPU provider has), or for OpenVINO also ``"bf16"`` / ``"f16"``.

    Raises:
        QatkitError: unknown runtime or precision (the message lists the valid ones), or OpenVINO not installed.
        FileNotFoundError: ``path`` does not exist.

    Example:
        >>> rt = open_runtime("model.qdq.onnx", "openvino", threads=2)
        >>> outputs = rt.run({rt.input_names[0]: np.zeros((1, 3, 160, 160), np.float32)})
    """
    if runtime not in RUNTIMES:
        raise QatkitError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](path, threads=threads, precision=precision)
