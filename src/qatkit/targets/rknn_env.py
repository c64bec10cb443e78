"""The Python environment Rockchip's rknn-toolkit2 runs in: found, checked and installed apart from qatkit's own.

rknn-toolkit2 2.5.0 pins numpy<=1.26.4, onnx<=1.18 and protobuf<=4.25.4, which qatkit's environment (numpy 2, onnx
1.2x) cannot share, so it lives in a virtual environment of its own and qatkit drives it in a subprocess
(:mod:`qatkit.targets.rockchip`). Which Python runs it:

1. ``$QATKIT_RKNN_PYTHON``, if set (a Python with ``rknn.api`` importable, e.g. your own toolkit install);
2. else ``$QATKIT_RKNN_VENV/bin/python``, default ``~/.cache/qatkit/rknn-venv/bin/python``, which
   ``qatkit targets install rknn`` builds (``make .venv-rknn`` builds ``.venv-rknn`` in the repository).

The pins below are the versions tested here (docs/targets.md). The toolkit's own metadata asks for torch<=2.4 and
opencv-python; it imports and compiles with torch 2.13 (CPU) and the headless OpenCV, which are installed instead
(``--no-deps``), since those old wheels are not installable on every Python the toolkit supports.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import QatkitError

PYTHON_ENV = "QATKIT_RKNN_PYTHON"
VENV_ENV = "QATKIT_RKNN_VENV"
INSTALL_HINT = "qatkit targets install rknn (or, in the qatkit repository, make .venv-rknn)"
TOOLKIT = "rknn-toolkit2==2.5.0"
# what the toolkit imports, at versions within its pins (numpy, onnx, protobuf are its upper bounds)
DEPENDENCIES = ["numpy==1.26.4", "onnx==1.18.0", "protobuf==4.25.4", "onnxruntime==1.26.0", "scipy==1.17.1",
                "ruamel.yaml==0.19.1", "psutil==7.2.2", "fast-histogram==0.14", "opencv-python-headless==4.11.0.86",
                "tqdm==4.70.1", "flatbuffers==25.12.19", "packaging"]
# rknn.api imports torch while it builds; the CPU build, without its CUDA dependencies
TORCH = "torch==2.13.0"
TORCH_DEPENDENCIES = ["sympy==1.14.0", "networkx==3.6.1", "jinja2==3.1.6", "filelock", "fsspec", "typing_extensions"]


def default_venv() -> Path:
    """Where ``qatkit targets install rknn`` puts the toolkit's environment unless told otherwise."""
    return Path(os.environ.get(VENV_ENV) or Path.home() / ".cache" / "qatkit" / "rknn-venv")


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def toolkit_python() -> Path:
    """The Python that runs rknn-toolkit2, checked: ``rknn.api`` imports there.

    Raises:
        QatkitError: no such Python, or the toolkit does not import in it; the message names the command that
            installs it.

    Example:
        >>> python = toolkit_python()   # e.g. ~/.cache/qatkit/rknn-venv/bin/python
    """
    named = os.environ.get(PYTHON_ENV)
    python = Path(named) if named else _venv_python(default_venv())
    return _checked(python, f"${PYTHON_ENV}={named}" if named else f"{python} (set ${PYTHON_ENV} to use another)")


def _checked(python: Path, where: str) -> Path:
    if not python.is_file():
        raise QatkitError(f"the rknn target needs Rockchip's rknn-toolkit2 in its own Python environment, and there "
                          f"is no Python at {where}: install it with `{INSTALL_HINT}`")
    proc = subprocess.run([str(python), "-c", "import rknn.api"], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise QatkitError(f"rknn-toolkit2 does not import in {where}: {last}. Reinstall it with `{INSTALL_HINT}`")
    return python


def install(venv: str | Path | None = None, *, python: str | Path | None = None, quiet: bool = True) -> Path:
    """Create (or refresh) a virtual environment with rknn-toolkit2 and the pinned versions it runs with.

    Args:
        venv: the environment's folder (default :func:`default_venv`).
        python: the interpreter to create it with (default: the one running qatkit; the toolkit has wheels for
            CPython 3.8 to 3.12 on x86_64 and aarch64 Linux).
        quiet: pass ``--quiet`` to pip.

    Returns:
        The environment's Python (what ``$QATKIT_RKNN_PYTHON`` may name).

    Raises:
        QatkitError: a step failed; the message names it (pip's own output went to the terminal).

    Example:
        >>> install("/opt/rknn-venv")       # then: export QATKIT_RKNN_PYTHON=/opt/rknn-venv/bin/python
    """
    venv = Path(venv) if venv else default_venv()
    if not _venv_python(venv).is_file():
        _step([str(python or sys.executable), "-m", "venv", str(venv)], "create the virtual environment")
    pip = [str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"] + (["--quiet"] if quiet
                                                                                               else [])
    _step(pip + ["--no-deps", TOOLKIT], f"install {TOOLKIT}")
    _step(pip + DEPENDENCIES, "install the toolkit's dependencies")
    _step(pip + ["--no-deps", TORCH], f"install {TORCH} (CPU build)")
    _step(pip + TORCH_DEPENDENCIES, "install torch's dependencies")
    return _checked(_venv_python(venv), str(_venv_python(venv)))


def _step(cmd: list[str], what: str) -> None:
    if subprocess.run(cmd).returncode:
        raise QatkitError(f"rknn environment: could not {what} (`{' '.join(cmd)}` failed, its output is above)")
