"""Export: a QDQ ONNX graph (QuantizeLinear/DequantizeLinear, per-channel axis on weights), checked by onnx.checker.

Uses PyTorch's TorchScript-based exporter (``dynamo=False``): it runs the model's real forward, hooks and all, and
honours the quantizers' ``symbolic`` methods, so weights and biases land as int8/int32 constants. The dynamo
exporter does not handle fake-quant ops reliably yet (pytorch#167063); torch is pinned accordingly.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..calibrate import uncalibrated
from ..capture import tensors_of
from ..errors import NotCalibratedError
from ..quant.quantizer import INT16_DOMAIN
from ..quantize import as_inputs
from .initializers import constants_to_initializers
from .int16 import widen_int16
from .softmax import decompose_softmax as _decompose_softmax
from .unsigned import to_unsigned_activations

OPSET = 17


def export_onnx(model: nn.Module, example_inputs, path: str | Path, *, opset: int = OPSET,
                dynamic_batch: bool = True, unsigned_activations: bool = False,
                decompose_softmax: bool | None = None) -> Path:
    """Write ``model`` (quantized or float) to ``path`` as ONNX and check it; returns the path.

    Args:
        model: a calibrated quantized model (or a float one).
        example_inputs: a tensor or tuple of tensors the model's forward takes.
        path: the ONNX file to write (atomically).
        opset: ONNX opset (16-bit grids raise it to 21, see qatkit.export.int16).
        dynamic_batch: the batch dimension of inputs and outputs is symbolic.
        unsigned_activations: write signed activation grids on the equivalent unsigned container (int8 zero point
            z -> uint8 z + 128: the same real values). For OpenVINO, which miscomputes some signed-int8 activation
            graphs (docs/openvino.md); not for TensorRT, which wants zero point 0.
        decompose_softmax: write each float Softmax over a non-last axis (YOLOv8's DFL) as reductions and
            element-wise ops, which ONNX Runtime's CPU runs several times faster (qatkit.export.softmax). None: as
            the recipe says (on for ``onnxruntime``); a float model's export leaves Softmax alone unless True.

    Raises:
        NotCalibratedError: a quantizer has no scale yet.

    Example:
        >>> qatkit.export_onnx(qm, (torch.rand(1, 3, 640, 640),), "model.qdq.onnx")
    """
    if hasattr(model, "_qatkit"):
        missing = uncalibrated(model)
        if missing:
            raise NotCalibratedError(
                f"cannot export: {len(missing)} quantizer(s) are not calibrated ({', '.join(missing[:5])}...). "
                "Run qatkit.calibrate(model, batches) first"
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = as_inputs(example_inputs)
    input_names = [f"input{i}" if i else "images" for i in range(len(args))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n_out = len(tensors_of(model(*args)))
    output_names = [f"output{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in input_names + output_names} if dynamic_batch else None
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
                              custom_opsets={INT16_DOMAIN: 1} if _has_int16(model) else None)
        state = getattr(model, "_qatkit", None)
        if decompose_softmax is None:
            decompose_softmax = state is not None and bool(state.recipe.get("decompose_softmax", False))
        if state is not None or decompose_softmax:
            props = {} if state is None else {"qatkit.recipe": state.recipe.get("name", "custom"),
                                              "qatkit.float_layers": json.dumps(state.float_layers)}
            _finish(tmp, props, unsigned_activations, decompose_softmax)
        onnx.checker.check_model(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def _has_int16(model: nn.Module) -> bool:
    """Whether any quantizer's codes need a 16-bit container (exported through qatkit.export.int16)."""
    state = getattr(model, "_qatkit", None)
    return state is not None and any(q.scheme.container_bits == 16 for q in state.quantizers.values())


def _finish(path: Path, props: dict[str, str], unsigned_activations: bool, softmax: bool) -> None:
    """Add what ``qatkit inspect`` needs to tell layers kept float on purpose from placement mistakes, turn
    16-bit Q/DQ stand-ins into standard opset-21 nodes (qatkit.export.int16) and, if asked, put signed activation
    grids on unsigned containers (qatkit.export.unsigned) and decompose inner-axis Softmax
    (qatkit.export.softmax); then every Constant node becomes an initializer, where vendor compilers look for Q/DQ
    parameters (qatkit.export.initializers); one load and save."""
    model = onnx.load(str(path))
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model = widen_int16(model)
    if unsigned_activations:
        to_unsigned_activations(model)
    if softmax:
        _decompose_softmax(model)
    constants_to_initializers(model)
    onnx.save(model, str(path))
