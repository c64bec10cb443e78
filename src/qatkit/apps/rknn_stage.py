"""The Rockchip stage of ``qatkit run`` / ``qatkit demo`` (``--target rknn``): the QAT model's QDQ export compiled
into a ``.rknn`` file and checked in rknn-toolkit2's simulator, layer by layer and by the run's own metric."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn

from ..errors import QatkitError
from ..targets import rknn_env
from ..targets.rockchip import check_platform, compile_rknn
from ..verify import Metric, verify

TARGETS = ("onnx", "rknn")


def check_target(target: str, platform: str) -> None:
    """Before a run starts: the target and platform are known and, for rknn, the toolkit imports (a missing toolchain
    fails here, naming its install command, not after QAT).

    Args:
        target: ``"onnx"`` or ``"rknn"``.
        platform: the Rockchip chip (only read for ``"rknn"``).

    Example:
        >>> check_target("rknn", "rk3588")
    """
    if target not in TARGETS:
        raise QatkitError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "rknn":
        check_platform(platform)
        rknn_env.toolkit_python()


def rknn_stage(qm: nn.Module, qdq_path: Path, batches: Iterable, metric: Metric, out: Path, platform: str,
               log: Callable[[str], None] = print) -> dict:
    """Compile ``qdq_path`` to ``out/model.rknn`` for ``platform`` and verify it in the simulator; the summary keys.

    Args:
        qm: the QAT model the file was exported from.
        qdq_path: its QDQ ONNX export.
        batches: inputs for the layer-wise comparison.
        metric: ``metric(predict) -> float`` (the run's mAP), computed on the simulator and on PyTorch.
        out: the run's folder.
        platform: the Rockchip chip (``qatkit.targets.rockchip.PLATFORMS``).
        log: where the progress line goes.

    Example:
        >>> summary |= rknn_stage(qm, out / "model.qdq.onnx", val_batches, map_of, out, "rk3588")
    """
    rknn = compile_rknn(qdq_path, out / "model.rknn", platform=platform)
    report = verify(qm, qdq_path, batches, runtime="rknn", runtime_options={"platform": platform}, metric=metric)
    log(f"rknn ({platform}, simulator) int8 mAP {report.onnx_map:.4f}, layer-wise within one step "
        f"{report.within_one_step:.5f}; wrote {rknn}")
    return {"rknn_file": str(rknn), "rknn_platform": platform, "rknn_int8_map": report.onnx_map,
            "rknn_within_one_step": report.within_one_step, "rknn_max_steps": report.max_steps,
            "rknn_outputs_within_one_step": report.outputs_within_one_step,
            "rknn_worst_layers": report.worst_layers}
