"""The runtime contract every target implements: an exported file opened on one runtime, ``run`` a feed of named
arrays, outputs in the ONNX graph's order (:func:`qatkit.verify` is written once against it)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import QatkitError
from ..export.graph import graph_inputs

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


class GraphRuntime(Runtime):
    """A runtime whose input and output names are the ONNX file's own (read once from its graph), for back ends whose
    compiled model does not list them in the graph's order."""

    def _read_names(self, graph) -> None:
        """Take the input names (initializers left out) and output names from ``graph`` (an ``onnx.GraphProto``)."""
        self._inputs = [i.name for i in graph_inputs(graph)]
        self._names = [o.name for o in graph.output]

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._names)
