"""Predictors: ``images -> outputs`` callables for a PyTorch module or an exported ONNX file, the one interface the
evaluators (:func:`qatkit.apps.eval.detect.evaluate`, :func:`qatkit.apps.eval.yolo_map.yolo_map`) score.

An ONNX file exported with a fixed batch size (``export_onnx(..., dynamic_batch=False)``, or ``yolo export``'s
default) takes only that many images per run: :func:`onnx_predictor` splits a batch into runs of that size and pads
the last one with zero images, whose outputs it drops, so any batch size and a last partial batch score the same.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch

from ...errors import QatkitError
from ...export.graph import graph_inputs
from ...targets import open_runtime

Predictor = Callable[[torch.Tensor], Sequence[torch.Tensor]]


def torch_predictor(model: torch.nn.Module) -> Predictor:
    """``images -> model(images)`` in eval mode without autograd (a qatkit-quantized model keeps its fake-quant).

    Args:
        model: any module; it is put in eval mode (ultralytics models then return ``(decoded, raw)``).

    Example:
        >>> predict = torch_predictor(YOLO("best.pt").model)
        >>> decoded = predict(torch.rand(2, 3, 640, 640))[0]   # (2, 4 + nc, anchors)
    """
    model.eval()

    @torch.no_grad()
    def predict(images: torch.Tensor) -> Sequence[torch.Tensor]:
        return model(images)

    return predict


def input_shape(path: str | Path) -> list[int | None]:
    """The first graph input's shape of the ONNX file at ``path``; ``None`` for a symbolic (dynamic) dimension."""
    graph = onnx.load(str(path), load_external_data=False).graph
    first = graph_inputs(graph)[0]
    return [d.dim_value if d.HasField("dim_value") else None for d in first.type.tensor_type.shape.dim]


def onnx_predictor(path: str | Path, runtime: str = "onnxruntime", *, threads: int | None = None,
                   precision: str = "f32") -> Predictor:
    """``images -> list of output tensors`` of an ONNX file on a CPU runtime (:func:`qatkit.targets.open_runtime`).

    A fixed batch dimension is honoured by running chunks of that size and padding the last one (module docstring);
    a fixed height/width that differs from the images' raises.

    Args:
        path: an ONNX file with one image input (``qatkit.export_onnx`` writes one, float or QDQ).
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        threads: the runtime's intra-op threads; ``None``: its default.
        precision: ``"f32"``; OpenVINO also ``"bf16"`` / ``"f16"`` (see docs/openvino.md).

    Raises:
        QatkitError: unknown runtime or precision, or images of another size than a fixed-size input.
        FileNotFoundError: ``path`` does not exist.

    Example:
        >>> predict = onnx_predictor("model.qdq.onnx", "openvino")
        >>> decoded = predict(torch.rand(5, 3, 640, 640))[0]
    """
    run = open_runtime(path, runtime, threads=threads, precision=precision).predictor()
    shape = input_shape(path)
    fixed_batch = shape[0] if shape else None

    def predict(images: torch.Tensor) -> list[torch.Tensor]:
        for want, got in zip(shape[2:], images.shape[2:]):
            if want is not None and want != got:
                raise QatkitError(f"{path} takes images of {shape[2:]} pixels (H, W), got {list(images.shape[2:])}: "
                                  f"score it at imgsz={shape[2]} or export it again at this size")
        if not fixed_batch or len(images) == fixed_batch:
            return run(images)
        chunks = []
        for chunk in images.split(fixed_batch):
            padding = fixed_batch - len(chunk)
            if padding:
                chunk = torch.cat([chunk, chunk.new_zeros((padding, *chunk.shape[1:]))])
            chunks.append([out[:fixed_batch - padding] for out in run(chunk)])
        return [torch.cat(outs) for outs in zip(*chunks)]

    return predict
