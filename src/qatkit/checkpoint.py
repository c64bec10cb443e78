"""Save and load quantized models: weights, quantizer state and recipe, rebuilt on the float model.

A checkpoint stores no pickled code: ``load`` re-runs ``quantize`` on a fresh float model (or its factory) with the
stored recipe and example-input shapes, checks that placement gives the same sites, then loads the tensors with
``torch.load(weights_only=True)``. Writes are atomic (temp file + rename), so a crash never leaves half a file.

Every file qatkit writes names its format and version, ``<name>-<version>`` (``qatkit-quantized-1``), and the qatkit
version that wrote it. A file of an older version than this qatkit reads is an error that says how to re-create it;
a newer one says to upgrade qatkit. Bump a ``*_VERSION`` when a stored key changes meaning.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from importlib import metadata as _metadata
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .quantize import quantization_state, quantize

FORMAT_NAME, VERSION = "qatkit-quantized", 1
FORMAT = f"{FORMAT_NAME}-{VERSION}"
# How to get a readable file when one is older than this qatkit reads (no older versions exist yet: version 1 is
# the first of each format, so any older file was hand-made or from a pre-release).
RECREATE = {
    "qatkit-quantized": "re-create it from the float model: `qatkit calibrate` (then `qatkit qat`), or "
                        "qatkit.quantize + qatkit.calibrate + qatkit.save",
    "qatkit-float": "re-create it with `qatkit train-float`, or save the float model again with "
                    "qatkit.apps.stages.save_float",
    "qatkit-train-state": "start the QAT run again without --resume",
}


def _qatkit_version() -> str:
    try:
        return _metadata.version("qatkit")
    except _metadata.PackageNotFoundError:
        return "unknown"


def header(fmt: str) -> dict[str, str]:
    """The keys every qatkit file starts with: its format (``name-version``) and the qatkit version writing it.

    Args:
        fmt: the format string, e.g. :data:`FORMAT`.

    Example:
        >>> header("qatkit-float-1")["format"]
        'qatkit-float-1'
    """
    return {"format": fmt, "qatkit_version": _qatkit_version()}


def _split(fmt: object) -> tuple[str, int] | None:
    """``"qatkit-quantized-1"`` -> ``("qatkit-quantized", 1)``; None for anything else."""
    m = re.fullmatch(r"(.+)-(\d+)", fmt) if isinstance(fmt, str) else None
    return (m.group(1), int(m.group(2))) if m else None


def check_format(ckpt: object, expected_format: str, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` is a dict of ``expected_format`` (name and version).

    Args:
        ckpt: what ``torch.load`` returned.
        expected_format: ``name-version`` this qatkit reads.
        path: the file, for the message.

    Example:
        >>> check_format({"format": "qatkit-float-2"}, "qatkit-float-1", "f.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qatkit.errors.CheckpointError: f.pt has format qatkit-float-2, newer than this qatkit ...: upgrade qatkit ...
    """
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found == expected_format:
        return
    name, version = _split(expected_format)
    got = _split(found)
    if not isinstance(ckpt, dict) or got is None or got[0] != name:
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (found format {found!r})")
    if got[1] > version:
        writer = ckpt.get("qatkit_version")
        raise CheckpointError(f"{path} has format {found}" + (f", written by qatkit {writer}" if writer else "")
                              + f", newer than this qatkit ({_qatkit_version()}) reads ({expected_format}): "
                              "upgrade qatkit (pip install -U qatkit)")
    raise CheckpointError(f"{path} has format {found}, older than this qatkit reads ({expected_format}), and "
                          f"cannot be converted: {RECREATE.get(name, 're-create it with this qatkit')}")


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
    """Load a qatkit file (tensors only, no pickled code) and check its format and version (:func:`check_format`).

    Args:
        path: the file.
        expected_format: ``name-version`` this qatkit reads, e.g. :data:`FORMAT`.

    Raises:
        CheckpointError: missing, unreadable, another format, or an older/newer version (naming the fix).

    Example:
        >>> ckpt = read_checkpoint("runs/demo/ptq.pt", FORMAT)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not ours"
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    check_format(ckpt, expected_format, path)
    return ckpt


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def save(model: nn.Module, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``model``'s weights, quantizer state, sites and recipe to ``path`` (atomically)."""
    state = quantization_state(model)
    return atomic_save({
        **header(FORMAT),
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
    saved = ckpt["state_dict"]
    quantization_state(model).bias_shifts.expect(saved, "_qatkit.bias_shifts.")  # (bias correction's, if any)
    current = model.state_dict()
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
