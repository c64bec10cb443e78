"""Golden placements (issue #10): every model x built-in recipe has a reference site table in tests/golden/.

As NNCF's reference graphs (tests/torch/test_compressed_graph.py): ``qatkit.quantize`` (placement only, no
calibration) is rendered as text, one site / quantizer per line, sorted, and compared with the stored file. A diff is
a placement change: review it, then regenerate with

    QATKIT_REGEN_GOLDEN=1 pytest tests/test_golden_placement.py

Only public state is read: ``quantization_state(model)`` ``.site_table()``, ``.quantizers``, ``.outputs`` and
``.float_layers``. Site fields are rendered generically (every field that is set), so a new Site field shows up as
a diff too.
"""
from __future__ import annotations

import copy
import difflib
import functools
import os
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import qatkit
from qatkit.apps.models.detector import DetectorConfig, TinyYolo

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("QATKIT_REGEN_GOLDEN", "") not in ("", "0")
HINT = "QATKIT_REGEN_GOLDEN=1 pytest tests/test_golden_placement.py"
SIZE = 64  # example input 1x3xSIZExSIZE: every model here accepts it, and the site keys do not depend on it
RECIPES = sorted(qatkit.builtin_recipes())


def _extra(name: str):
    """An optional extra; CI installs all of them, so there a missing one fails instead of skipping."""
    if os.environ.get("CI"):
        return __import__(name)
    return pytest.importorskip(name)


def _ultralytics(cfg: str) -> nn.Module:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    _extra("ultralytics")
    from ultralytics.nn.tasks import DetectionModel
    return DetectionModel(cfg, verbose=False)


MODELS = {  # names as in tests/test_model_matrix.py
    "qatkit_demo_detector": lambda: TinyYolo(DetectorConfig()),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "yolov8n": lambda: _ultralytics("yolov8n.yaml"),
}


@functools.cache
def _float_model(name: str) -> nn.Module:
    """Built once per process (random weights, nothing downloaded); quantize a deep copy of it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MODELS[name]().eval()


def _quantized(name: str, recipe: str) -> nn.Module:
    model = copy.deepcopy(_float_model(name))  # quantize() edits the model (``_qatkit``, silu_to_relu)
    return qatkit.quantize(model, recipe, (torch.zeros(1, 3, SIZE, SIZE),))


def _natural(s: str) -> tuple:
    """Sort key: ``model.2`` before ``model.10``; the string itself breaks ties."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)], s


def _site_key(key: str) -> str:
    return key or "<root>"  # ROOT: the model's own call (its inputs are the model inputs)


def render(model: nn.Module, title: str) -> str:
    """The placement of a quantized model as sorted, one-entry-per-line text."""
    state = qatkit.quantization_state(model)
    table = state.site_table()
    uses: dict[str, list[str]] = {}  # quantizer -> where it is applied (bias_from only reads its scale)
    sites = []
    for key in sorted(table, key=_natural):
        site, fields = table[key], []
        for i, q in sorted(site["inputs"].items()):
            fields.append(f"in{i}={q}")
            uses.setdefault(q, []).append(f"{_site_key(key)}:in{i}")
        for field, value in site.items():
            if field in ("kind", "inputs") or value is None or value is False:
                continue
            fields.append(field if value is True else f"{field}={value}")
            if field in ("output", "weight", "sigmoid"):
                uses.setdefault(value, []).append(f"{_site_key(key)}:{field}")
        sites.append("  ".join([_site_key(key), site["kind"], *fields]))

    quantizers = []
    for k, q in sorted(((k.replace(":", "."), q) for k, q in state.quantizers.items()), key=lambda kq: _natural(kq[0])):
        extra = [f"scale_mode={q.scheme.scale_mode}"]
        extra += [f"channels={q.scale.numel()}"] if q.scheme.per_channel else []
        extra += ["dynamic"] if q.dynamic else []
        extra += [f"name={q.name}"] if q.name != k else []
        extra += ["UNUSED"] if k not in uses and k not in state.outputs else []
        quantizers.append("  ".join([k, q.scheme.describe(), *extra]))
    shared = [f"{k}  <-  " + ", ".join(sorted(where, key=_natural))
              for k, where in sorted(uses.items(), key=lambda kw: _natural(kw[0])) if len(where) > 1]
    outputs = [f"{i}  {q if q is not None else '-'}" for i, q in enumerate(state.outputs)]

    return "\n".join([
        f"# qatkit golden placement: {title}, example input 1x3x{SIZE}x{SIZE}",
        f"# A diff is a placement change: review it, then regenerate with {HINT}",
        "",
        f"[sites] {len(sites)}: key  kind  in<i>/output/weight/sigmoid = quantizer applied there, other Site fields",
        *sites,
        "",
        f"[quantizers] {len(quantizers)}: key  scheme.describe()  scale_mode  channels  dynamic (recomputed per call)",
        *quantizers,
        "",
        f"[shared] {len(shared)}: quantizers applied at more than one place (a value read by several ops, concat /"
        " shape-op scale groups)",
        *shared,
        "",
        f"[outputs] {len(outputs)}: model output index -> quantizer ('-': float)",
        *outputs,
        "",
        f"[float_layers] {len(state.float_layers)}: conv/linear kept float by the recipe or a rule",
        *sorted(state.float_layers, key=_natural),
        "",
    ])


@functools.cache
def _rendered(name: str, recipe: str) -> str:
    return render(_quantized(name, recipe), f"{name} x {recipe}")


def _diff(expected: str, actual: str, path: Path, limit: int = 60) -> str:
    lines = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), str(path), "current", lineterm="",
                                      n=2))
    more = [f"... {len(lines) - limit} more diff lines"] if len(lines) > limit else []
    return "\n".join(lines[:limit] + more)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_golden_placement(name, recipe):
    actual = _rendered(name, recipe)
    path = GOLDEN / f"{name}__{recipe}.txt"
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(actual)
        assert path.read_text() == actual
        return
    if not path.exists():
        pytest.fail(f"no golden placement {path}; create it with {HINT} (then review and commit it)", pytrace=False)
    expected = path.read_text()
    if expected != actual:
        pytest.fail(f"placement of {name} under {recipe} differs from {path}:\n{_diff(expected, actual, path)}\n"
                    f"If the change is intended, regenerate: {HINT}", pytrace=False)


@pytest.mark.parametrize("name,recipe", [("qatkit_demo_detector", "tensorrt"), ("resnet18", "npu-int8-sym"),
                                         ("yolov8n", "onnxruntime")])
def test_placement_is_deterministic(name, recipe):
    """Quantizing the same float model again in one process (after other models were quantized, when the golden
    tests ran first) gives the identical table: no counter or cache leaks from one quantize() into the next."""
    first = _rendered(name, recipe)
    again = render(_quantized(name, recipe), f"{name} x {recipe}")
    assert again == first, _diff(first, again, Path("first quantize()"))


def test_no_stale_golden_files():
    """A golden file whose model or recipe left the matrix would otherwise sit there unchecked."""
    expected = {f"{name}__{recipe}.txt" for name in MODELS for recipe in RECIPES}
    stale = sorted(p for p in GOLDEN.glob("*.txt") if p.name not in expected)
    if REGEN:
        for p in stale:
            p.unlink()
        stale = [p for p in stale if p.exists()]
    assert not stale, f"golden files for no model x recipe in the matrix: {[p.name for p in stale]}; remove ({HINT})"
