"""The core never imports an application (docs: /work/shared/DESIGN.md, "Layout: a core and its applications").

The core is ``src/qatkit`` outside ``src/qatkit/apps`` and ``src/qatkit/integrations``; the applications (demo
detector, shapes/COCO data, mAP, the demo's training loop, run config, CLI stages, demo) live in ``qatkit.apps``, the
integrations with other training frameworks (ultralytics' trainer) in ``qatkit.integrations``, and both import the
core like user code.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "qatkit"
APP_DIRS = ("apps", "integrations")  # application-side packages under src/qatkit
APPS = tuple(f"qatkit.{d}" for d in APP_DIRS)
# where the applications lived before they moved to qatkit.apps: a core import of these names is an app import too
MOVED = ("qatkit.demo", "qatkit.stages", "qatkit.runconfig", "qatkit.cli", "qatkit.data", "qatkit.eval",
         "qatkit.models", "qatkit.train.loop", "qatkit.assets")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not any(PACKAGE / d in p.parents for d in APP_DIRS))


def _is_app(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in (*APPS, *MOVED))


def imported_names(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth (functions, try blocks, ...)."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[:len(base_parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]  # from qatkit import apps
    return out


def test_core_modules_are_found():
    names = {_module_name(p) for p in core_modules()}
    assert {"qatkit", "qatkit.verify", "qatkit.analysis.report", "qatkit.train.distill"} <= names
    assert not any(_is_app(n) for n in names), sorted(n for n in names if _is_app(n))


def test_import_resolution_sees_relative_and_nested_imports(tmp_path):
    # the checker itself: relative imports resolve, and an import inside a function is seen
    assert "qatkit.quantize" in {n for _, n in imported_names(PACKAGE / "analysis" / "report.py")}  # from ..quantize
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..apps.eval.detect import evaluate\n    from .. import apps\n")
    found = [n for _, n in imported_names(probe, module="qatkit.analysis.probe") if _is_app(n)]
    assert found == ["qatkit.apps.eval.detect", "qatkit.apps.eval.detect.evaluate", "qatkit.apps"]


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_core_module_imports_no_application(path):
    bad = [f"line {line}: {name}" for line, name in imported_names(path) if _is_app(name)]
    assert not bad, f"core module {_module_name(path)} imports an application: {bad}"


def test_importing_the_core_loads_no_application():
    modules = sorted({_module_name(p) for p in core_modules()})
    code = ("import sys, importlib\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            f"print('\\n'.join(sorted(m for m in sys.modules if m in {APPS!r} "
            f"or m.startswith({tuple(a + '.' for a in APPS)!r}))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing the core loaded applications: {proc.stdout.split()}"


_BLOCK = "import sys\nfor m in {names!r}:\n    sys.modules[m] = None  # as if not installed\n"


def test_the_core_needs_no_application_dependency():
    # the core installs without the apps/report extras: it imports with torchvision, Pillow, faster-coco-eval,
    # matplotlib (and the bench/peer packages) absent; only qatkit.analysis.report needs matplotlib ([report])
    absent = ["torchvision", "PIL", "faster_coco_eval", "matplotlib", "ultralytics", "timm", "openvino", "onnxscript"]
    modules = sorted({_module_name(p) for p in core_modules()} - {"qatkit.analysis.report"})
    code = _BLOCK.format(names=absent) + f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module, missing, extra", [("qatkit.apps.cli", "faster_coco_eval", "apps"),
                                                    ("qatkit.apps.stages", "torchvision", "apps"),
                                                    ("qatkit.analysis.report", "matplotlib", "report")])
def test_a_missing_optional_dependency_names_the_extra(module, missing, extra):
    code = _BLOCK.format(names=[missing]) + f"import {module}\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"pip install 'qatkit[{extra}]'" in proc.stderr.splitlines()[-1], proc.stderr
