"""``qatkit`` command line: run, demo, train-float, calibrate, qat, export, verify, inspect, sensitivity, targets.

Every stage reads a run config (``--config run.yaml``, see :mod:`qatkit.apps.runconfig`) plus flags, and writes a file
the next stage starts from: float checkpoint -> ptq.pt -> qat.pt -> model.qdq.onnx -> verify report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import QatkitError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (keys of qatkit.apps.runconfig.RunConfig)")
    p.add_argument("--data", help="COCO-format dataset root (the shapes set is generated there if missing)")
    p.add_argument("--recipe", help="built-in recipe name or recipe YAML path")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")


def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="the float model (docs/models.md): demo (default), an ultralytics model yaml "
                                   "(yolov8n.yaml, path/to/model.yaml), an ultralytics checkpoint written by `yolo "
                                   "train` (best.pt: unpickled, trusted files only), or package.module:factory")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="an ultralytics checkpoint (best.pt from `yolo train`) or model yaml, or demo; "
                                   "default: the shipped YOLO11n trained on the generated clutter set (docs/ultralytics.md)")
    p.add_argument("--data", help="an ultralytics data.yaml (for the demo detector: a COCO root); default: the "
                                  "clutter set, generated at data/clutter when missing")
    p.add_argument("--recipe", default="onnxruntime", help="built-in recipe name or recipe YAML path")
    p.add_argument("--out", default="runs/run", help="output folder: summary.json, report.html, ONNX files, QAT run")
    p.add_argument("--epochs", type=int, default=2, help="QAT epochs (ultralytics models)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of the training set per QAT epoch")
    p.add_argument("--steps", type=int, dest="qat_steps", help="QAT steps (the demo detector)")
    p.add_argument("--img-size", type=int, help="input size (default: the size the checkpoint was trained at)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches of --batch training images")
    _bias_correction(p)
    p.add_argument("--lr", type=float, default=1e-4, help="QAT learning rate (AdamW, linear decay to 1%%); 0: "
                   "ultralytics' automatic choice (for training from scratch)")
    p.add_argument("--live-bn", action="store_true", help="BatchNorm uses batch statistics during QAT (default: "
                   "running statistics, BN folded as deployed: right for fine-tuning a trained model)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted QAT run in --out")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    _target_flags(p, "also compile model.rknn and check it in rknn-toolkit2's simulator (layer-wise and mAP)")


def _target_flags(p: argparse.ArgumentParser, rknn: str) -> None:
    p.add_argument("--target", choices=("onnx", "rknn"), default="onnx", help=f"onnx: the QDQ ONNX file; rknn: {rknn}"
                   " (docs/targets.md; the toolkit installs with `qatkit targets install rknn`)")
    p.add_argument("--platform", default="rk3588", help="the Rockchip chip for --target rknn (rk3588, rk3576, "
                   "rk3568, rk3566, rk3562, rv1106, ...)")


def _run_command(args: argparse.Namespace) -> None:
    """``qatkit run``: ultralytics models through :mod:`qatkit.apps.run_yolo`, the demo detector through the demo."""
    from .model_source import DEMO, parse_model
    from .runconfig import default_yolo

    model, data = (args.model, args.data) if args.model else default_yolo(args.data)
    source = parse_model(model)
    if source.kind == DEMO:
        from .demo import run_demo
        from .runconfig import load_run_config

        cfg = load_run_config(None, model=model, data=data, recipe=args.recipe, out=args.out, quiet=args.quiet,
                              qat_steps=args.qat_steps, calib_batches=args.calib_batches, target=args.target,
                              platform=args.platform)
        run_demo(_demo_only(cfg, "run"))
        return
    if data is None or Path(data).suffix.lower() not in (".yaml", ".yml"):
        raise QatkitError(f"qatkit run --model {model} needs --data path/to/data.yaml (an ultralytics dataset), "
                          f"got {data!r}")
    from .run_yolo import YoloRunOptions, run_yolo

    opts = YoloRunOptions(recipe=args.recipe, out=Path(args.out), epochs=args.epochs, fraction=args.fraction,
                          imgsz=args.img_size, batch=args.batch, calib_batches=args.calib_batches,
                          bias_correction=bool(args.bias_correction), lr0=args.lr or None,
                          freeze_bn=not args.live_bn, resume=args.resume, quiet=bool(args.quiet), target=args.target,
                          platform=args.platform)
    run_yolo(source, data, opts)


def _bias_correction(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bias-correction", action="store_true", default=None,
                   help="after calibration, shift each layer's bias by the mean error its weight rounding adds to "
                        "its output (qatkit.correct_bias; docs/ptq.md)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qatkit", description="Quantization-aware training with verified INT8 ONNX.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="PTQ -> QAT -> export -> verify -> latency on the demo detector")
    _common(p)
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.add_argument("--qat-steps", type=int)
    p.add_argument("--method", help="PTQ calibrator: max, ema, percentile, mse, entropy")
    _bias_correction(p)
    _model(p)
    p = sub.add_parser("run", help="float eval -> calibrate -> QAT -> export -> verify -> latency on your model and "
                                   "data (ultralytics YOLO in ultralytics' trainer, or the demo detector)")
    _run_flags(p)
    p = sub.add_parser("train-float", help="train the demo detector's float checkpoint")
    _common(p)
    p.add_argument("--out", default="runs/float/demo_float.pt")
    p.add_argument("--steps", type=int, dest="float_steps")
    _model(p)
    p = sub.add_parser("calibrate", help="quantize the float model and calibrate it (PTQ) -> checkpoint")
    _common(p)
    p.add_argument("--float-checkpoint")
    _model(p)
    p.add_argument("--method")
    _bias_correction(p)
    p.add_argument("--out", default="runs/demo/ptq.pt")
    p = sub.add_parser("qat", help="fine-tune a calibrated checkpoint with fake quantization -> checkpoint")
    _common(p)
    p.add_argument("--checkpoint", default="runs/demo/ptq.pt")
    p.add_argument("--steps", type=int, dest="qat_steps")
    p.add_argument("--lr", type=float, dest="qat_lr")
    p.add_argument("--out", default="runs/demo/qat.pt")
    p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every",
                   help="write a resumable training state (<out>.state.pt) every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt if it exists")
    p.add_argument("--nproc", type=int, default=1, help="DDP processes (torchrun underneath; gloo on CPU)")
    p = sub.add_parser("export", help="export a quantized checkpoint to QDQ ONNX (or float ONNX + encodings)")
    _common(p)
    p.add_argument("--checkpoint", default="runs/demo/qat.pt")
    p.add_argument("--format", choices=("qdq", "encodings"), default="qdq",
                   help="qdq: QuantizeLinear/DequantizeLinear ONNX (ORT, OpenVINO, TensorRT); encodings: float ONNX "
                        "+ AIMET-style .encodings beside it (Qualcomm QNN/SNPE), see docs/targets.md")
    p.add_argument("--out", help="ONNX file (default runs/demo/model.qdq.onnx, or runs/demo/model.onnx with "
                                 "--format encodings); with --target rknn the .rknn file (default runs/demo/model.rknn)"
                                 ", its QDQ ONNX beside it")
    _target_flags(p, "compile the QDQ file into a .rknn model (rknn-toolkit2, no calibration data)")
    p.add_argument("--unsigned-activations", action="store_true",
                   help="write signed activation grids on the equivalent uint8 grid (zero point + 128, same values): "
                        "for OpenVINO, which miscomputes some signed-int8 graphs (docs/openvino.md); not for TensorRT")
    p = sub.add_parser("inspect", help="table of quantizers and a placement lint, for a checkpoint or an ONNX file")
    p.add_argument("path", help="a qatkit checkpoint (.pt) or an exported ONNX model (.onnx)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the lint finds anything")
    p = sub.add_parser("sensitivity", help="per-layer sensitivity sweep; --budget finds layers to keep float")
    _common(p)
    p.add_argument("--checkpoint", default="runs/demo/ptq.pt", help="a calibrated (PTQ) checkpoint")
    p.add_argument("--metric", choices=("map", "sqnr"), default="map",
                   help="map: mAP on the first --eval-images val images; sqnr: output SQNR (no labels)")
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument("--budget", type=float, help="keep float the fewest layers so that map >= budget x float map")
    p.add_argument("--top", type=int, default=20, help="rows of the table to print")
    p.add_argument("--only", help="regex: sweep only the groups (module paths / op keys) it matches")
    p.add_argument("--out", default="runs/sensitivity")
    p = sub.add_parser("verify", help="compare the ONNX model in ONNX Runtime or OpenVINO with its checkpoint")
    _common(p)
    p.add_argument("--checkpoint", default="runs/demo/qat.pt")
    p.add_argument("--onnx", default="runs/demo/model.qdq.onnx")
    from ..targets import RUNTIMES

    p.add_argument("--runtime", choices=list(RUNTIMES), default="onnxruntime")
    p.add_argument("--precision", default="f32", help="float precision of the runtime's non-integer parts "
                   "(OpenVINO: f32, bf16, f16)")
    p.add_argument("--platform", help="--runtime rknn: the Rockchip chip to compile for (default rk3588)")
    p = sub.add_parser("targets", help="the deployment targets: which are installed, and install a toolkit")
    p.add_argument("action", choices=("list", "install"))
    p.add_argument("name", nargs="?", help="install: the target (rknn)")
    p.add_argument("--venv", help="install: the environment's folder (default ~/.cache/qatkit/rknn-venv, or "
                                  "$QATKIT_RKNN_VENV)")
    return ap


def _config(args: argparse.Namespace, **extra):
    from .runconfig import load_run_config

    keys = ("data", "recipe", "quiet", "method", "bias_correction", "qat_steps", "qat_lr", "float_steps",
            "float_checkpoint", "checkpoint_every", "model")
    overrides = {k: getattr(args, k, None) for k in keys} | extra
    return load_run_config(args.config, **overrides)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command in ``nproc`` processes under torch.distributed.run (torchrun)."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # drop --nproc N / --nproc=N
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "qatkit.apps.cli", *rest]
    return subprocess.call(cmd)


def _init_distributed() -> int:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPUs); rank 0 when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def _sensitivity(args: argparse.Namespace, cfg, stages, train, val) -> None:
    """Sweep, optional budget search with re-placed models, then sensitivity.json and keep_float.yaml in --out."""
    import yaml

    from ..analysis.sensitivity import groups, keep_float_recipe, sensitivity, sqnr_metric
    from .eval.detect import evaluate, torch_predictor
    from ..quantize import quantization_state

    if args.eval_images < 1:
        raise QatkitError(f"--eval-images must be at least 1, got {args.eval_images}")
    qm = stages.load_quantized(args.checkpoint)
    recipe = quantization_state(qm).recipe
    if args.metric == "map":
        def metric(m):
            return evaluate(torch_predictor(m), val, limit=args.eval_images)["map"]
    else:
        if args.budget is not None:
            raise QatkitError("--budget is a fraction of the float mAP: use it with --metric map")
        metric = sqnr_metric(qm, list(stages.image_batches(train, 2, cfg.batch_size, cfg.seed)))
    float_model = stages.load_float(cfg.float_checkpoint)

    def requantize(keep: list[str]):
        return stages.ptq(cfg.model_copy(update={"recipe": keep_float_recipe(recipe, keep), "quiet": True}),
                          float_model, train)

    only = None
    if args.only:
        import re

        only = [g for g in groups(qm) if re.search(args.only, g)]
        if not only:
            raise QatkitError(f"--only {args.only!r} matches no quantizer group; `qatkit inspect` lists them")
    name = "mAP" if args.metric == "map" else "output SQNR (dB)"
    report = sensitivity(qm, metric, metric_name=name, target=args.budget, relative=True, requantize=requantize,
                         quiet=cfg.quiet, only=only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(report.as_dict(), indent=2))
    from ..analysis.report import write_sensitivity_report

    write_sensitivity_report(out, report, "qatkit " + " ".join(sys.argv[1:]))
    print(report.table(args.top))
    if args.budget is not None:
        path = out / "keep_float.yaml"
        path.write_text(yaml.safe_dump(keep_float_recipe(recipe, report.keep_float), sort_keys=False))
        print(f"wrote {path}: use it as --recipe for calibrate/qat/demo")


def _demo_only(cfg, command: str):
    """demo and train-float evaluate mAP with the demo detector's decoder: only the demo detector (from any qatkit
    float checkpoint) fits them."""
    from .model_source import DEMO, parse_model

    source = parse_model(cfg.model)
    if source.kind != DEMO:
        raise QatkitError(f"{command} runs the demo detector only, not --model {cfg.model}: quantize other models "
                          "with `qatkit calibrate --model ...`, then export / verify with --checkpoint")
    return cfg.model_copy(update={"float_checkpoint": Path(source.spec)}) if source.spec else cfg


def _datasets_once(stages, cfg, rank: int):
    """Under DDP, rank 0 generates a missing dataset while the others wait."""
    from .. import distributed

    if distributed.world_size() == 1:
        return stages.datasets(cfg)
    import torch.distributed as dist

    if rank == 0:
        out = stages.datasets(cfg)
        dist.barrier()
        return out
    dist.barrier()
    return stages.datasets(cfg)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import torch

    from . import stages
    from .eval.detect import evaluate, torch_predictor

    cmd = args.command
    if cmd == "run":
        _run_command(args)
        return 0
    if cmd == "demo":
        from .demo import run_demo

        run_demo(_demo_only(_config(args, out=args.out), "demo"))
        return 0
    if cmd == "targets":
        from .target_commands import targets_command

        return targets_command(args.action, args.name, args.venv)
    if cmd == "inspect":
        from ..analysis import inspect as ins

        path = Path(args.path)
        if path.suffix == ".onnx":
            rows, lint = ins.onnx_rows(path), ins.lint_onnx(path)
        else:
            model = stages.load_quantized(path)
            rows, lint = ins.model_rows(model), ins.lint_model(model)
        print(ins.format_report(rows, lint))
        return 1 if args.strict and ins.problems(lint) else 0
    cfg = _config(args)
    if cmd == "train-float":
        _demo_only(cfg, "train-float")
        _, metrics = stages.train_float(cfg, args.out)
        print(f"float mAP@0.5:0.95 {metrics['map']:.4f}; wrote {args.out}")
        return 0
    rank = 0
    if cmd == "qat":
        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _torchrun(args.nproc, sys.argv[1:] if argv is None else argv)
        rank = _init_distributed()
    train, val = _datasets_once(stages, cfg, rank)
    example = (torch.zeros(1, 3, cfg.img_size, cfg.img_size),)
    if cmd == "calibrate":
        from .model_source import DEMO, parse_model

        source = parse_model(cfg.model)
        qm = stages.ptq(cfg, source.build(cfg.float_checkpoint), train)
        stages.save_quantized(qm, args.out, "ptq", source)
        if source.kind == DEMO:  # mAP needs the demo detector's decoder
            print(f"PTQ mAP@0.5:0.95 {evaluate(torch_predictor(qm), val, quiet=cfg.quiet)['map']:.4f}; "
                  f"wrote {args.out}")
        else:
            print(f"wrote {args.out}")
    elif cmd == "qat":
        state_path = Path(args.out).with_suffix(".state.pt")
        qm = stages.qat(cfg, stages.load_quantized(args.checkpoint).train(), train, state_path=state_path,
                        resume=args.resume)
        if rank > 0:
            return 0
        stages.save_quantized(qm, args.out, "qat")
        print(f"QAT mAP@0.5:0.95 {evaluate(torch_predictor(qm), val, quiet=cfg.quiet)['map']:.4f}; wrote {args.out}")
    elif cmd == "export":
        qm = stages.load_quantized(args.checkpoint)
        if args.format == "encodings":
            from ..encodings import export_encodings

            for path in export_encodings(qm, example, args.out or "runs/demo/model.onnx"):
                print(f"wrote {path}")
        else:
            from ..export import export_onnx

            rknn = Path(args.out or "runs/demo/model.rknn") if args.target == "rknn" else None
            if rknn is not None:
                from .rknn_stage import check_target

                check_target(args.target, args.platform)
            path = export_onnx(qm, example, rknn.with_suffix(".qdq.onnx") if rknn else
                               args.out or "runs/demo/model.qdq.onnx", unsigned_activations=args.unsigned_activations)
            print(f"wrote {path}")
            if rknn is not None:
                from ..targets.rockchip import compile_rknn

                print(f"wrote {compile_rknn(path, rknn, platform=args.platform)}")
    elif cmd == "sensitivity":
        _sensitivity(args, cfg, stages, train, val)
    elif cmd == "verify":
        from ..verify import verify

        qm = stages.load_quantized(args.checkpoint)
        from .models.detector import TinyYolo

        metric = (lambda predict: evaluate(predict, val)["map"]) if isinstance(qm, TinyYolo) else None  # demo mAP
        report = verify(qm, args.onnx, stages.val_batches(val, cfg.batch_size), runtime=args.runtime,
                        precision=args.precision, metric=metric,
                        runtime_options={"platform": args.platform} if args.platform else None)
        print(json.dumps(report.as_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args, argv)
    except (QatkitError, FileNotFoundError) as e:
        print(f"qatkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
