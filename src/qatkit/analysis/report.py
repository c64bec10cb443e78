"""One self-contained HTML report per run (charts embedded as PNG) and a Markdown twin (PNGs beside it).

Contents: the float/PTQ/QAT/ONNX table, latency, a sensitivity bar chart, per-layer activation histograms with
the clip range each quantizer chose, every quantizer with its scale and how many sites share it, and the lint.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from pathlib import Path

try:
    import matplotlib
except ImportError as e:  # an optional dependency: the rest of qatkit works without it
    raise ImportError("qatkit.analysis.report draws with matplotlib, not installed here: "
                      "pip install 'qatkit[report]'") from e

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ..quantize import as_inputs, quantization_state  # noqa: E402
from .inspect import format_report, lint_model, model_rows  # noqa: E402
from .sensitivity import SensitivityReport  # noqa: E402


@torch.no_grad()
def activation_histograms(model: nn.Module, batches: Iterable, count: int = 12, bins: int = 128) -> dict:
    """Histograms of what ``count`` calibrated activation quantizers see (fake-quant off), with their clip ranges.

    The quantizers are spread evenly over the placement order, so the charts run from input to head; those of a
    range fixed in advance (a SiLU's sigmoid) are left out.
    """
    state = quantization_state(model)
    acts = [q for q in state.quantizers.values() if q.calibrated_from_data]
    chosen = acts[:: max(1, len(acts) // count)][:count]
    seen: dict[str, list[torch.Tensor]] = {q.name: [] for q in chosen}
    handles = [q.register_forward_pre_hook(lambda m, args: seen[m.name].append(args[0].detach().flatten()))
               for q in chosen]
    enabled = {k: bool(q.fake_quant_enabled) for k, q in state.quantizers.items()}
    try:
        for q in state.quantizers.values():
            q.enable_fake_quant(False)
        model.eval()
        for batch in batches:
            model(*as_inputs(batch))
    finally:
        for h in handles:
            h.remove()
        for k, q in state.quantizers.items():
            q.enable_fake_quant(enabled[k])
    out = {}
    for q in chosen:
        if not seen[q.name]:  # (a quantizer these batches did not reach)
            continue
        x = torch.cat(seen[q.name]).float()
        lo, hi = float(x.min()), float(x.max())
        counts = torch.histc(x, bins, lo, hi if hi > lo else lo + 1)
        out[q.name] = {"lo": lo, "hi": hi, "counts": counts.tolist(),
                       "clip": (float(q.range_lo.min()), float(q.range_hi.max()))}
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _accuracy_chart(summary: dict) -> bytes:
    names = ["float", "PTQ", "QAT", "ONNX fp32", "ONNX int8"]
    keys = ["float_map", "ptq_map", "qat_map", "onnx_fp32_map", "onnx_int8_map"]
    values = [summary[k] for k in keys]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [3, 1]})
    ax.bar(names, values, color=["#777", "#e9a23b", "#3b7de9", "#999", "#2a9d4b"])
    ax.set_ylim(min(values) - 0.02, max(values) + 0.01)
    ax.set_ylabel("mAP@0.5:0.95")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=8)
    bx.bar(["fp32", "int8"], [summary["fp32_ms"], summary["int8_ms"]], color=["#999", "#2a9d4b"])
    bx.set_ylabel("ORT ms, batch 1")
    return _png(fig)


def _sensitivity_chart(report: SensitivityReport, top: int = 25) -> bytes:
    groups = report.groups[:top]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(groups) + 1))
    gain = [g.all_but - report.quantized_metric for g in groups]
    ax.barh([g.group for g in groups][::-1], gain[::-1], color="#3b7de9")
    ax.set_xlabel(f"{report.metric} gained by keeping this group float (all others quantized)")
    kept = set(report.keep_float)
    for label in ax.get_yticklabels():
        if label.get_text() in kept:
            label.set_color("#c0392b")
    return _png(fig)


def _histogram_chart(hists: dict) -> bytes:
    n = len(hists)
    cols = 3
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(11, 2.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (name, h) in zip(axes.flat, hists.items()):
        counts = h["counts"]
        width = (h["hi"] - h["lo"]) / len(counts) if h["hi"] > h["lo"] else 1.0
        ax.bar([h["lo"] + (i + 0.5) * width for i in range(len(counts))], counts, width=width, color="#999")
        ax.set_yscale("log")
        for x in h["clip"]:
            ax.axvline(x, color="#c0392b", lw=1)
        ax.set_title(name if len(name) < 40 else "..." + name[-37:], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def write_sensitivity_report(out: str | Path, report: SensitivityReport, command: str = "") -> Path:
    """``sensitivity.html`` (chart embedded, keep-float set in red) and ``sensitivity.md`` + PNG, for
    ``qatkit sensitivity``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = _sensitivity_chart(report)
    (out / "sensitivity.png").write_bytes(png)
    lines = [f"float {report.float_metric:.4f}, all quantized {report.quantized_metric:.4f} ({report.metric})"]
    if report.target is not None:
        lines.append(f"keep float for target {report.target:.4f}: {', '.join(report.keep_float) or '(none)'} "
                     f"-> {report.reached:.4f}")
    if command:
        lines.append(f"command: {command}")
    table = report.table(40)
    md = ["# qatkit sensitivity", "", *lines, "", "![sensitivity](sensitivity.png)", "", "```", table, "```"]
    (out / "sensitivity.md").write_text("\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>qatkit sensitivity</title></head>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'><h1>qatkit sensitivity</h1>"
            + "".join(f"<p>{html.escape(line)}</p>" for line in lines)
            + f"<img style='max-width:100%' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            + f"<pre>{html.escape(table)}</pre></body></html>")
    (out / "sensitivity.html").write_text(page)
    return out / "sensitivity.html"


def write_report(out: str | Path, summary: dict, model: nn.Module, *, sensitivity: SensitivityReport | None = None,
                 histograms: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (+ PNGs) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    charts = {"accuracy": _accuracy_chart(summary)}
    if sensitivity is not None and sensitivity.groups:
        charts["sensitivity"] = _sensitivity_chart(sensitivity)
    if histograms:
        charts["histograms"] = _histogram_chart(histograms)
    for name, png in charts.items():
        (out / f"report_{name}.png").write_bytes(png)
    f = summary["float_map"]
    rows = [("float mAP (PyTorch)", f"{f:.4f}"), ("PTQ mAP", f"{summary['ptq_map']:.4f} ({summary['ptq_map'] / f:.4f}x)"),
            ("QAT mAP", f"{summary['qat_map']:.4f} ({summary['qat_map'] / f:.4f}x)"),
            ("fp32 ONNX mAP (ORT)", f"{summary['onnx_fp32_map']:.4f}"),
            ("int8 ONNX mAP (ORT)", f"{summary['onnx_int8_map']:.4f}"),
            ("layer-wise ORT = PyTorch within one step", f"{summary['within_one_step']:.5f}"),
            ("ORT latency fp32 / int8 (ms)", f"{summary['fp32_ms']:.2f} / {summary['int8_ms']:.2f} "
                                             f"({summary['fp32_ms'] / summary['int8_ms']:.2f}x)"),
            ("recipe", str(summary.get("recipe")))]
    if summary.get("rknn_int8_map") is not None:  # qatkit run --target rknn
        rows[-1:-1] = [(f"int8 .rknn mAP (rknn-toolkit2 simulator, {summary['rknn_platform']})",
                        f"{summary['rknn_int8_map']:.4f}"),
                       ("layer-wise rknn simulator = PyTorch within one step",
                        f"{summary['rknn_within_one_step']:.5f}")]
    lint = lint_model(model)
    quantizers = format_report(model_rows(model), lint)
    titles = {"accuracy": "Accuracy and latency", "sensitivity": "Sensitivity (keep-float set in red)",
              "histograms": "Activation histograms (red: the quantizer's clip range)"}
    md = ["# qatkit report", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    body = ["<h1>qatkit report</h1>", "<table>"] + [f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                   for k, v in rows] + ["</table>"]
    for name, png in charts.items():
        md += ["", f"## {titles[name]}", "", f"![{name}](report_{name}.png)"]
        body += [f"<h2>{titles[name]}</h2>",
                 f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">']
    if sensitivity is not None and sensitivity.target is not None:
        line = (f"Keep float for target {sensitivity.target:.4f}: {', '.join(sensitivity.keep_float) or '(none)'} "
                f"-> {sensitivity.reached:.4f}")
        md += ["", line]
        body += [f"<p>{html.escape(line)}</p>"]
    md += ["", "## Quantizers and lint", "", "```", quantizers, "```"]
    body += ["<h2>Quantizers and lint</h2>", f"<pre>{html.escape(quantizers)}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>qatkit report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}td{padding:2px 12px}"
            "pre{font-size:11px}img{max-width:100%}</style></head><body>" + "\n".join(body) + "</body></html>")
    (out / "report.html").write_text(page)
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.html", out / "report.md"
