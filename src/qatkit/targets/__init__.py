"""Targets: where an exported model runs. Each is one module with a :class:`Runtime` (ONNX Runtime, OpenVINO, the
rknn-toolkit2 simulator) registered in ``RUNTIMES``; :func:`open_runtime` opens a file on one by name, and :func:`qatkit.verify` is written
once against that contract, so a new toolchain is one module here.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import QatkitError
from .base import Predictor, Runtime
from .openvino import OpenVino
from .ort import OnnxRuntime
from .rockchip import Rknn

__all__ = ["Predictor", "Runtime", "RUNTIMES", "open_runtime", "OnnxRuntime", "OpenVino", "Rknn"]

RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (OnnxRuntime, OpenVino, Rknn)}


def open_runtime(path: str | Path, runtime: str = "onnxruntime", *, threads: int | None = None,
                 precision: str = "f32", **options) -> Runtime:
    """Open the ONNX model at ``path`` on an inference runtime (ONNX Runtime or OpenVINO on the CPU, or a Rockchip NPU
    in rknn-toolkit2's simulator).

    Args:
        path: an ONNX file (``qatkit.export_onnx`` writes one).
        runtime: ``"onnxruntime"``, ``"openvino"`` or ``"rknn"`` (the keys of ``RUNTIMES``).
        threads: intra-op threads (ORT) / inference threads (OpenVINO); ``None``: the runtime's default.
        precision: float precision for the parts of the graph that are not integer: ``"f32"`` (the default, and the
            only one ONNX Runtime's CPU provider has), or for OpenVINO also ``"bf16"`` / ``"f16"``.
        **options: the runtime's own settings, e.g. ``platform="rk3566"`` for rknn (:class:`qatkit.targets.rockchip.Rknn`).

    Raises:
        QatkitError: unknown runtime, precision or option (the message lists the valid ones), or the runtime's
            package or toolkit is not installed (the message names the install command).
        FileNotFoundError: ``path`` does not exist.

    Example:
        >>> rt = open_runtime("model.qdq.onnx", "openvino", threads=2)
        >>> outputs = rt.run({rt.input_names[0]: np.zeros((1, 3, 160, 160), np.float32)})
    """
    if runtime not in RUNTIMES:
        raise QatkitError(f"unknown runtime {runtime!r}; valid runtimes: {', '.join(RUNTIMES)}")
    cls = RUNTIMES[runtime]
    valid = [p for p in inspect.signature(cls).parameters if p not in ("path", "threads", "precision")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise QatkitError(f"runtime {runtime!r} has no option {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}")
    return cls(path, threads=threads, precision=precision, **options)
