"""Dump what a QAT run time computes, to check a run-time change bit for bit against an earlier commit.

For the demo detector, torchvision resnet18 and an ultralytics YOLOv8n (yaml, random weights), under the 4 built-in
recipes, BN live and frozen: outputs and parameter gradients of two AdamW steps on fixed batches, then eval outputs
and the final state_dict. One torch thread. Run it in a checkout of each commit, then compare::

    PYTHONPATH=/path/to/old/src python scripts/runtime_dump.py dump /tmp/old.pt
    python scripts/runtime_dump.py dump /tmp/new.pt
    python scripts/runtime_dump.py compare /tmp/old.pt /tmp/new.pt   # exit 0: every tensor bit-identical

A change to calibration moves the ranges and so everything after them. To check the rest of the run time alone,
give both dumps ``--qparams FILE``: the first one calibrates and saves every quantizer's buffers there, the second
loads them instead of calibrating.

Float tensors are compared by their bits (so -0.0 and +0.0 differ).
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import qatkit

RECIPES = ("onnxruntime", "tensorrt", "npu-int8-sym", "npu-uint8")


def models() -> dict[str, nn.Module]:
    import torchvision
    from ultralytics.nn.tasks import DetectionModel

    from qatkit.apps.runconfig import RunConfig
    from qatkit.apps.stages import load_float

    out = {"demo": load_float(RunConfig(quiet=True).float_checkpoint)}
    torch.manual_seed(0)
    out["resnet18"] = torchvision.models.resnet18(num_classes=10)
    torch.manual_seed(0)
    out["yolov8n"] = DetectionModel("yolov8n.yaml", nc=8, verbose=False)
    return out


def tensors(out) -> list[torch.Tensor]:
    """The tensors of a (nested) model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in tensors(item)]
    return []


def run(model: nn.Module, recipe: str, frozen: bool, batches: list[torch.Tensor],
        qparams: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    """One case's tensors, and its quantizer buffers after calibrating (or loading ``qparams`` instead)."""
    torch.manual_seed(0)
    qm = qatkit.quantize(copy.deepcopy(model), recipe, (batches[0][:1],))
    quantizers = qatkit.quantization_state(qm).quantizers
    if qparams is None:
        qatkit.calibrate(qm, [batches[0]])
    else:
        for key, q in quantizers.items():
            q.load_state_dict(qparams[key])
    used = {k: {b: v.clone() for b, v in q.state_dict().items()} for k, q in quantizers.items()}
    if frozen:
        qatkit.freeze(qm, bn=True)
    qm.train()
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-3)
    record = []
    for x in batches:
        out = tensors(qm(x))
        record += [o.detach().clone() for o in out]
        opt.zero_grad()
        sum(o.square().mean() for o in out).backward()
        record += [p.grad.clone() for p in qm.parameters() if p.grad is not None]
        opt.step()
    qm.eval()
    with torch.no_grad():
        record += [t.clone() for t in tensors(qm(batches[1]))]
    return record + [v.clone() for v in qm.state_dict().values()], used


def dump(path: str, qparams_path: str | None = None) -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 96, 96, generator=g) for _ in range(2)]
    loaded = torch.load(qparams_path) if qparams_path and Path(qparams_path).is_file() else None
    result, saved = {}, {}
    for name, m in models().items():
        for recipe in RECIPES:
            for frozen in (False, True):
                key = (name, recipe, frozen)
                result[key], saved[key] = run(m, recipe, frozen, batches, None if loaded is None else loaded[key])
    torch.save(result, path)
    if qparams_path and loaded is None:
        torch.save(saved, qparams_path)
    return 0


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    different = 0
    for key in a:
        same = key in b and len(a[key]) == len(b[key]) and all(
            u.shape == v.shape and torch.equal(_bits(u), _bits(v)) for u, v in zip(a[key], b[key]))
        different += not same
        print(*key, "identical" if same else "DIFFERENT")
    return 1 if different else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    dump_cmd = sub.add_parser("dump")
    dump_cmd.add_argument("out")
    dump_cmd.add_argument("--qparams", help="quantizer buffers: saved here after calibrating if the file is missing, "
                                            "else loaded instead of calibrating")
    cmp = sub.add_parser("compare")
    cmp.add_argument("a")
    cmp.add_argument("b")
    args = ap.parse_args()
    return dump(args.out, args.qparams) if args.command == "dump" else compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
