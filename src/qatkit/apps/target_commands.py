"""``qatkit targets list`` / ``qatkit targets install rknn``: which deployment toolkits this machine can run, and
installing the one that needs its own environment (Rockchip's rknn-toolkit2, :mod:`qatkit.targets.rknn_env`)."""
from __future__ import annotations

from ..errors import QatkitError
from ..targets import RUNTIMES, rknn_env

INSTALLABLE = ("rknn",)


def targets_command(action: str, name: str | None, venv: str | None) -> int:
    """Print each runtime and whether it runs here (``list``), or install a toolkit's environment (``install``).

    Args:
        action: ``"list"`` or ``"install"``.
        name: for ``install``, the target (``"rknn"``).
        venv: for ``install``, the environment's folder (default: :func:`qatkit.targets.rknn_env.default_venv`).

    Example:
        >>> targets_command("install", "rknn", None)   # then `qatkit export --target rknn` works
    """
    if action == "install":
        if name not in INSTALLABLE:
            raise QatkitError(f"qatkit targets install: name a target to install ({', '.join(INSTALLABLE)}), got "
                              f"{name!r}; onnxruntime and openvino come with qatkit's own extras")
        python = rknn_env.install(venv)
        print(f"rknn-toolkit2 installed: {python}")
        if venv:
            print(f"point qatkit at it: export {rknn_env.PYTHON_ENV}={python}")
        return 0
    for runtime in RUNTIMES:
        print(f"{runtime:<12} {_status(runtime)}")
    return 0


def _status(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return f"ready (onnxruntime {onnxruntime.__version__})"
    if runtime == "openvino":
        try:
            import openvino
        except ImportError:
            return "not installed: pip install 'qatkit[openvino]'"
        return f"ready (openvino {openvino.__version__})"
    if runtime == "rknn":
        try:
            return f"ready ({rknn_env.toolkit_python()})"
        except QatkitError as e:
            return f"not ready: {e}"
    return "registered"
