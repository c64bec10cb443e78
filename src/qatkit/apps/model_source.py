"""Where the stages' float model comes from (``--model`` / run-config ``model``), and how a checkpoint rebuilds it.

Accepted forms (docs/models.md):

- ``demo`` (the default): the demo detector, weights from ``float_checkpoint``;
- an ultralytics model yaml (``yolov8n.yaml``, ``yolo11n.yaml``, a path): built offline, random weights;
- an ultralytics checkpoint ``*.pt`` written by ``yolo train``: unpickled (a .pt is code: trusted files only);
- ``package.module:factory``: the factory is called with no arguments and must return an ``nn.Module``.

A quantized checkpoint records its source in ``metadata["model"]`` (:meth:`ModelSource.record`); for ultralytics
models that record holds the architecture dict (``model.yaml``), so the checkpoint stays self-contained and
``weights_only``-loadable. :func:`rebuild` turns a record back into a float model; ``qatkit.load`` adds the weights.

Example::

    source = parse_model("yolov8n.yaml")
    model = source.build()
    record = source.record(model)      # {"kind": "ultralytics-yaml", "spec": "yolov8n.yaml", "yaml": {...}}
    same_architecture = rebuild(record)
"""
from __future__ import annotations

import copy
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, QatkitError

DEMO, YAML, PT, FACTORY = "demo", "ultralytics-yaml", "ultralytics-pt", "factory"
FORMS = ("demo (the default: the demo detector from float_checkpoint); an ultralytics model yaml (yolov8n.yaml, "
         "yolo11n.yaml, or a path to a .yaml); an ultralytics checkpoint written by `yolo train` (path/to/best.pt); "
         "package.module:factory (a function taking no arguments that returns an nn.Module)")
_FACTORY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_INSTALL = "pip install 'qatkit[ultralytics]'"


class ModelSourceError(QatkitError, ValueError):
    """``--model`` names nothing qatkit can build: the message names the problem and the accepted forms."""


def _ultralytics_tasks():
    """``ultralytics.nn.tasks``, offline (YOLO_OFFLINE=1: nothing is downloaded, no update checks)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        from ultralytics.nn import tasks
    except ImportError as e:
        raise ModelSourceError(f"ultralytics models need the ultralytics package ({e}): {_INSTALL}") from None
    return tasks


@dataclass(frozen=True)
class ModelSource:
    """One parsed ``--model`` value: ``kind`` (demo, ultralytics-yaml, ultralytics-pt, factory) and its ``spec``."""

    kind: str
    spec: str = ""

    def build(self, float_checkpoint: str | Path | None = None) -> nn.Module:
        """The float model, in eval mode (demo weights from ``float_checkpoint``; yaml models random)."""
        if self.kind == DEMO:
            from .runconfig import DEMO_FLOAT
            from .stages import load_float

            return load_float(self.spec or float_checkpoint or DEMO_FLOAT)
        if self.kind == YAML:
            return _build_yaml(self.spec)
        if self.kind == PT:
            return _load_ultralytics_pt(self.spec)
        return _call_factory(self.spec)

    def record(self, model: nn.Module) -> dict:
        """What a checkpoint stores to rebuild ``model``'s architecture (plain data, weights_only-loadable)."""
        rec = {"kind": self.kind, "spec": self.spec}
        if self.kind in (YAML, PT):
            rec |= {"class": type(model).__name__, "yaml": copy.deepcopy(dict(model.yaml))}
        return rec


def parse_model(spec: str | Path | None) -> ModelSource:
    """Parse a ``--model`` value (see the module docstring); raises :class:`ModelSourceError` listing the forms."""
    s = str(spec).strip() if spec is not None else DEMO
    if s in ("", DEMO):
        return ModelSource(DEMO)
    low = s.lower()
    if low.endswith((".yaml", ".yml")):
        return ModelSource(YAML, s)
    if low.endswith(".pt"):
        return _classify_pt(Path(s))
    if _FACTORY_RE.fullmatch(s):
        return ModelSource(FACTORY, s)
    raise ModelSourceError(f"--model {s!r} is not a model this qatkit can build; accepted forms: {FORMS}")


def _classify_pt(path: Path) -> ModelSource:
    """A qatkit float checkpoint is the demo detector; anything else must be an ultralytics checkpoint."""
    if not path.is_file():
        raise CheckpointError(f"--model {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - pickled objects: perhaps ultralytics', checked when it is loaded
        return ModelSource(PT, str(path))
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if isinstance(fmt, str) and fmt.startswith("qatkit-float"):
        return ModelSource(DEMO, str(path))
    if isinstance(fmt, str) and fmt.startswith("qatkit-quantized"):
        raise CheckpointError(f"--model {path} is a quantized qatkit checkpoint ({fmt}): pass it as --checkpoint "
                              "to qat, export, verify, inspect or sensitivity")
    raise CheckpointError(f"--model {path} is neither an ultralytics nor a qatkit checkpoint: found "
                          f"{_describe(ckpt)}. A state_dict holds no architecture: write a package.module:factory "
                          "that builds the model and loads it, and pass that as --model")


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = list(obj)
        return f"a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _build_yaml(cfg: str | dict, cls: str = "DetectionModel") -> nn.Module:
    tasks = _ultralytics_tasks()
    model_cls = getattr(tasks, cls, None)
    if not (isinstance(model_cls, type) and issubclass(model_cls, tasks.BaseModel)):
        raise CheckpointError(f"ultralytics {tasks.__name__} has no model class {cls!r}: upgrade ultralytics")
    try:
        model = model_cls(copy.deepcopy(cfg), verbose=False)
    except Exception as e:  # noqa: BLE001 - ultralytics raises many kinds; all mean "cannot build this yaml"
        what = cfg if isinstance(cfg, str) else "the recorded architecture"
        raise ModelSourceError(f"ultralytics cannot build a model from {what} ({type(e).__name__}: {e}): give a "
                               "model yaml ultralytics ships (yolov8n.yaml, yolo11n.yaml, ...) or a path to a "
                               "valid one") from None
    return model.float().eval()


def _load_ultralytics_pt(path: str) -> nn.Module:
    """The model in a `yolo train` checkpoint, chosen as ultralytics' load_checkpoint does (EMA, else model).

    Unpickles the file (torch.load weights_only=False): only for a file the user named, see docs/models.md.
    BN is not fused and nothing is put in eval-fused form: qatkit folds BN itself.
    """
    tasks = _ultralytics_tasks()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--model {path} is neither an ultralytics nor a qatkit checkpoint: torch.load "
                              f"failed ({type(e).__name__}: {e})") from None
    candidate = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(candidate, tasks.BaseModel):
        found = _describe(ckpt) + (f" whose model is {_describe(candidate)}" if candidate is not None else "")
        raise CheckpointError(f"--model {path} is neither an ultralytics nor a qatkit checkpoint: found {found}; "
                              "an ultralytics checkpoint (written by `yolo train`) holds an ultralytics model "
                              "under 'ema' or 'model'")
    return candidate.float().eval()


def _call_factory(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(f"--model {spec}: cannot import module {module_name!r} ({e}); put it on "
                               f"PYTHONPATH or install it. Accepted forms: {FORMS}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSourceError(f"--model {spec}: module {module_name!r} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"--model {spec}: {attr}() returned {_describe(model)}, not a torch.nn.Module")
    return model.eval()


def infer_source(model: nn.Module) -> ModelSource:
    """The source of a model built without one: the demo detector or an ultralytics model."""
    from .models.detector import TinyYolo

    if isinstance(model, TinyYolo):
        return ModelSource(DEMO)
    if isinstance(getattr(model, "yaml", None), dict) and type(model).__module__.startswith("ultralytics."):
        return ModelSource(YAML, str(model.yaml.get("yaml_file", "")))
    raise ModelSourceError(f"cannot tell how to rebuild a {type(model).__qualname__}: pass its ModelSource "
                           "(e.g. parse_model('package.module:factory')) to save_quantized")


def rebuild(record: dict | None, detector_config: dict | None = None) -> nn.Module:
    """The float architecture a checkpoint's ``metadata["model"]`` record names (random or demo-init weights).

    No record (checkpoints from before model sources) means the demo detector of ``detector_config``.
    """
    kind = (record or {}).get("kind", DEMO)
    if kind == DEMO:
        from .models.detector import build_detector

        return build_detector(detector_config)
    if kind in (YAML, PT):
        return _build_yaml(record["yaml"], record.get("class", "DetectionModel"))
    if kind == FACTORY:
        return _call_factory(record["spec"])
    raise CheckpointError(f"the checkpoint records model kind {kind!r}, which this qatkit does not know "
                          f"({DEMO}, {YAML}, {PT}, {FACTORY}): upgrade qatkit")
