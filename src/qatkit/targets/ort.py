"""ONNX Runtime (CPU) as a target: the :class:`~qatkit.targets.base.Runtime` verify uses, and the session, predictor
and latency helpers the demo and the benchmarks share."""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from .base import Runtime


def session(path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None):
    """A CPU session with all graph optimisations (QDQ fusion into QLinear* kernels happens here)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist: run `qatkit export` first")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predictor(sess):
    """Wrap a session as ``images -> list of output tensors`` (the interface the evaluators use)."""
    name = sess.get_inputs()[0].name

    def predict(images: torch.Tensor) -> Sequence[torch.Tensor]:
        return [torch.from_numpy(o) for o in sess.run(None, {name: images.detach().cpu().numpy()})]

    return predict


def latency_ms(path: str | Path, shape: Sequence[int], *, runs: int = 100, warmup: int = 10,
               threads: int | None = None) -> float:
    """Median wall time of one ``run`` in milliseconds (random input of ``shape``)."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).random(tuple(shape), dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def fused_op_counts(path: str | Path) -> dict[str, int]:
    """Op types of the graph ORT actually runs (after its QDQ fusions): shows what stayed float."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=out)
        counts: dict[str, int] = {}
        for node in onnx.load(str(out)).graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU provider with all graph optimisations (its QDQ fusions into QLinear* kernels)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None, precision: str = "f32") -> None:
        super().__init__(path, threads=threads, precision=precision)
        self.session = session(path, threads)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)
