"""OpenVINO (CPU plugin) as a target: it reads the QDQ ONNX file directly.

OpenVINO's CPU plugin defaults to bf16 arithmetic on CPUs with avx512_bf16 or AMX (this includes AMD Zen 4/5, see
docs/openvino.md): an 8-bit model's float parts (biases, SiLU, a float output conv) then round to 8 mantissa bits,
which shows as whole steps of disagreement. So the OpenVINO runtime pins ``f32`` unless asked otherwise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..errors import QatkitError
from .base import GraphRuntime


class OpenVino(GraphRuntime):
    """OpenVINO's CPU plugin reading the QDQ ONNX file directly (it turns Q/DQ pairs into FakeQuantize and fuses
    them into int8 kernels); ``precision`` sets INFERENCE_PRECISION_HINT for the parts that stay float."""

    name = "openvino"
    precisions = ("f32", "bf16", "f16")

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "f32") -> None:
        super().__init__(path, threads=threads, precision=precision)
        try:
            import openvino as ov
        except ImportError:
            raise QatkitError("runtime 'openvino' needs the OpenVINO package: pip install 'qatkit[openvino]'") \
                from None
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        graph = onnx.load(str(path), load_external_data=False).graph
        self._read_names(graph)
        self._outputs = [self._port(name) for name in self._names]

    def _port(self, name: str):
        for port in self.compiled.outputs:
            if name in port.get_names():
                return port
        raise QatkitError(f"OpenVINO compiled {self.path} without its graph output {name!r}; re-export the model "
                          "(`qatkit export`) and check it with `qatkit inspect`")

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.array(result[p], copy=True) for p in self._outputs]  # the request reuses its buffers
