"""Save and load quantized models: weights, quantizer state and recipe, rebuilt on the float model.

A checkpoint stores no pickled code: ``load`` re-runs ``quantize`` on a fresh float model (or its factory) with the
stored recipe and example-input shapes, checks that placement gives the same sites, then loads the tensors with
``torch.load(weights_only=True)``. Writes are atomic (temp file + rename), so a crash never leaves half a file.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .quantize import quantization_state, quantize

FORMAT = "qatkit-quantized-1"


def atomic_save(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != expected_format:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (found format {found!r})")
    return ckpt


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def save(model: nn.Module, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model``'s weights, quantizer state, sites and recipe to ``path`` (atomically)."""
    state = quantization_state(model)
    return atomic_save({
        "format": FORMAT,
        "model_class": _class_name(model),
        "recipe": state.recipe,
        "sites": state.site_table(),
        "outputs": state.outputs,
        "example_shapes": state.example_shapes,
        "state_dict": model.state_dict(),
        "metadata": metadata or {},
    }, path)


def load(model: nn.Module | Callable[[], nn.Module], path: str | Path, example_inputs=None) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``model`` (a float module, or a factory returning one)."""
    ckpt = read_checkpoint(path, FORMAT)
    if not isinstance(model, nn.Module):
        model = model()
    if _class_name(model) != ckpt["model_class"]:
        raise CheckpointError(
            f"checkpoint {path} was saved from {ckpt['model_class']}, not {_class_name(model)}: "
            "load it onto the model it came from"
        )
    if example_inputs is None:
        example_inputs = tuple(torch.zeros(shape) for shape in ckpt["example_shapes"])
    quantize(model, ckpt["recipe"], example_inputs)
    try:
        _check_and_load(model, ckpt, path)
    except CheckpointError:
        unquantize(model)  # leave the caller's float model as it was
        raise
    return model


def unquantize(model: nn.Module) -> nn.Module:
    """Remove qatkit's hooks and quantizers, giving back the float module."""
    state = quantization_state(model)
    state.detach()
    del model._qatkit
    return model


def _check_and_load(model: nn.Module, ckpt: dict, path: str | Path) -> None:
    if quantization_state(model).site_table() != ckpt["sites"]:
        raise CheckpointError(
            f"checkpoint {path} does not match this model: its quantizer placement differs "
            "(another architecture or configuration of the same class)"
        )
    current = model.state_dict()
    saved = ckpt["state_dict"]
    problems = sorted(set(current) ^ set(saved))
    problems += [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in current.items()
                 if k in saved and saved[k].shape != v.shape]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match this model: {len(problems)} tensor(s) differ "
            f"({'; '.join(problems[:3])}) - another architecture or configuration"
        )
    model.load_state_dict(saved)


def checkpoint_metadata(path: str | Path) -> dict:
    return read_checkpoint(path, FORMAT)["metadata"]
