"""Inference runtimes that run an exported ONNX model on the CPU: ONNX Runtime and OpenVINO, behind one contract.

:func:`open_runtime` opens a file on a runtime by name and gives back a :class:`Runtime`: its input names, its
outputs in the ONNX graph's order, ``run(feed)`` and ``predictor()``. :func:`qatkit.verify` is written once against
that contract; adding a runtime is one small class registered in ``RUNTIMES``.

OpenVINO's CPU plugin defaults to bf16 arithmetic on CPUs with avx512_bf16 or AMX (this includes AMD Zen 4/5, see
docs/openvino.md): an 8-bit model's float parts (biases, SiLU, a float output conv) then round to 8 mantissa bits,
which shows as whole steps of disagreement. So the OpenVINO runtime pins ``f32`` unless asked otherwise.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from .errors import QatkitError

Predictor = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class Runtime(ABC):
    """One ONNX model opened on one runtime: ``run`` a feed of named arrays, outputs in graph order."""

    name: str = ""
    precisions: tuple[str, ...] = ("f32",)

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "f32") -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist: run `qatkit export` first")
        if precision not in self.precisions:
            raise QatkitError(f"runtime {self.name!r} has no precision {precision!r}; valid: "
                              f"{', '.join(self.precisions)}")
        self.path, self.threads, self.precision = Path(path), threads, precision

    @property
    @abstractmethod
    def input_names(self) -> list[str]:
        """The graph inputs' names, in order."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """The graph outputs' names, in the order ``run`` returns them."""

    @abstractmethod
    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All graph outputs for ``feed`` (input name -> array), in the ONNX graph's output order."""

    @property
    def n_outputs(self) -> int:
        return len(self.output_names)

    def predictor(self) -> Predictor:
        """``images -> list of output tensors`` for a single-input model (the interface metrics and evaluators use).

        Example:
            >>> predict = open_runtime("model.qdq.onnx", "openvino").predictor()
            >>> outputs = predict(torch.rand(1, 3, 160, 160))
        """
        if len(self.input_names) != 1:
            raise QatkitError(f"predictor() needs a single-input model; {self.path} has inputs {self.input_names}: "
                              "call run() with a feed of all of them")
        name = self.input_names[0]

        def predict(images: torch.Tensor) -> list[torch.Tensor]:
            return [torch.from_numpy(o) for o in self.run({name: images.detach().cpu().numpy()})]

        return predict


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU provider with all graph optimisations (its QDQ fusions into QLinear* kernels)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "f32") -> None:
        super().__init__(path, threads=threads, precision=precision)
        from .onnx_runtime import session

        self.session = session(path, threads)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


class OpenVino(Runtime):
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
        self._names = [o.name for o in graph.output]
        self._outputs = [self._port(name) for name in self._names]
        self._inputs = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]

    def _port(self, name: str):
        for port in self.compiled.outputs:
            if name in port.get_names():
                return port
        raise QatkitError(f"OpenVINO compiled {self.path} without its graph output {name!r}; re-export the model "
                          "(`qatkit export`) and check it with `qatkit inspect`")

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._names)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.array(result[p], copy=True) for p in self._outputs]  # the request reuses its buffers


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
