"""Does ORT's int8 kernel compute what QAT trained? 8-bit vs 7-bit weights on this CPU (docs/onnxruntime.md).

On x86 CPUs without AVX-512 VNNI, ORT's u8s8 kernels multiply with VPMADDUBSW, which adds pairs of u8*s8
products in int16 with saturation: 255*127*2 = 64770 > 32767, so 8-bit weights can saturate; 7-bit weights
(255*64*2 = 32640) cannot. Run: python benchmarks/reduce_range.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from qatkit import export_onnx, verify
from qatkit.apps.eval.detect import evaluate, torch_predictor
from qatkit.targets.ort import predictor, session
from qatkit.apps.runconfig import RunConfig
from qatkit.apps.stages import datasets, load_float, ptq, val_batches


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/reduce_range")
    cfg = RunConfig(quiet=True)
    train, val = datasets(cfg)
    float_model = load_float(cfg.float_checkpoint)
    print("| weights | layer-wise within one step | worst layer (share > 1 step) | max steps | PyTorch mAP | ORT mAP |")
    print("|---|---|---|---|---|---|")
    for bits in (8, 7):
        cfg_b = cfg.model_copy(update={"recipe": {"base": "onnxruntime", "weight": {"bits": bits}}})
        qm = ptq(cfg_b, float_model, train)
        path = export_onnx(qm, (torch.zeros(1, 3, cfg.img_size, cfg.img_size),), out / f"w{bits}.onnx")
        r = verify(qm, path, val_batches(val, cfg.batch_size))
        worst = r.worst_layers[0] if r.worst_layers else ("-", 0.0)
        t_map = evaluate(torch_predictor(qm), val)["map"]
        o_map = evaluate(predictor(session(path)), val)["map"]
        print(f"| {bits}-bit | {r.within_one_step:.6f} | {worst[0]} ({worst[1]:.4f}) | {r.max_steps:.0f} | "
              f"{t_map:.4f} | {o_map:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
