"""Sensitivity: which quantizer groups cost accuracy, and the fewest layers to keep float to reach a target.

A *group* is one layer's quantizers: everything whose name starts with the same module path or op key
(``stage1.0.conv/weight``, ``stage1.0.conv/output`` ...), so a shared-scale quantizer is counted with the layer
that owns it. For each group the metric is measured twice, with fake-quant switched per quantizer (no re-placement,
so the sweep is cheap): *only this group quantized* (its own cost) and *everything but this group quantized*
(what keeping it float buys). ``keep_float_for`` then adds groups in order of what they buy until the metric
reaches the target, and :func:`keep_float_recipe` turns the set into a recipe with ``skip`` rules, which every
other stage accepts (seed 003's sensitivity analysis + ignore policy, automated).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..capture import tensors_of
from ..errors import QatkitError
from ..plan import is_input_quantizer, quantizer_owner
from ..progress import progress_bar
from ..quantize import as_inputs, quantization_state
from ..runtime.layer_cache import kept_layers

Metric = Callable[[nn.Module], float]


@dataclass
class GroupResult:
    group: str
    quantizers: int
    only_quantized: float  # metric with only this group quantized
    all_but: float  # metric with every other group quantized, this one float


@dataclass
class SensitivityReport:
    float_metric: float
    quantized_metric: float
    groups: list[GroupResult] = field(default_factory=list)  # most costly first
    keep_float: list[str] = field(default_factory=list)
    target: float | None = None
    reached: float | None = None
    metric: str = "metric"  # what the numbers are, for tables and charts

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self, top: int = 20) -> str:
        lines = [f"float {self.float_metric:.4f}, all quantized {self.quantized_metric:.4f}", "",
                 f"{'group':40s} {'only this quantized':>20s} {'all but this':>14s}"]
        lines += [f"{g.group:40s} {g.only_quantized:20.4f} {g.all_but:14.4f}" for g in self.groups[:top]]
        if self.target is not None:
            lines += ["", f"keep float for target {self.target:.4f}: {', '.join(self.keep_float) or '(none)'} "
                          f"-> {self.reached:.4f}"]
        return "\n".join(lines)


def sqnr_metric(model: nn.Module, batches: list) -> Metric:
    """A label-free proxy: output SQNR in dB against the same model with fake-quant off, averaged over the output
    channels (dim 1) of every output, so that a head's small-valued channels (class logits beside box
    coordinates) count as much as its large ones. Higher is better; 200 dB means identical."""
    inputs = [as_inputs(b) for b in batches]
    _enable(model, set())
    with torch.no_grad():
        reference = [tensors_of(model.eval()(*x)) for x in inputs]
    _enable(model, None)

    @torch.no_grad()
    def metric(m: nn.Module) -> float:
        signal: dict[int, torch.Tensor] = {}
        noise: dict[int, torch.Tensor] = {}
        for x, ref in zip(inputs, reference):
            for i, (r, o) in enumerate(zip(ref, tensors_of(m.eval()(*x)))):
                r, o = r.double(), o.double()
                dims = [d for d in range(r.ndim) if d != 1] if r.ndim > 1 else [0]
                signal[i] = signal.get(i, 0) + r.square().sum(dims)
                noise[i] = noise.get(i, 0) + (o - r).square().sum(dims)
        db = [10 * torch.log10(signal[i].clamp_min(1e-30) / noise[i].clamp_min(1e-30)) for i in signal]
        return float(torch.cat([d.reshape(-1) for d in db]).clamp(max=200.0).mean())

    return metric


def group_of(quantizer_name: str) -> str:
    """``stage1.0.conv/output`` -> ``stage1.0.conv``; ``stage1.0/add#0/output`` -> ``stage1.0/add#0``."""
    return quantizer_owner(quantizer_name)


def groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> quantizer keys (in ``QuantState.quantizers``)."""
    out: dict[str, list[str]] = {}
    for key, q in quantization_state(model).quantizers.items():
        out.setdefault(group_of(q.name), []).append(key)
    return out


def _enable(model: nn.Module, on: set[str] | None) -> None:
    """Fake-quant on for the quantizer keys in ``on`` (all when None), off for the rest."""
    for key, q in quantization_state(model).quantizers.items():
        q.enable_fake_quant(on is None or key in on)


def sensitivity(model: nn.Module, metric: Metric, *, metric_name: str = "metric", target: float | None = None,
                relative: bool = False,
                requantize: Callable[[list[str]], nn.Module] | None = None, quiet: bool = True,
                only: list[str] | None = None) -> SensitivityReport:
    """Per-group sweep of ``metric`` (higher is better) on a calibrated model; ``target``: find a keep-float set
    (with ``relative``, ``target`` is a fraction of the float metric, e.g. 0.97).

    ``requantize(keep_float)`` builds the model quantized with those groups float (e.g. quantize + calibrate the
    float model with :func:`keep_float_recipe`); the budget search then scores real re-placed models, which is
    what deploying the recipe gives (a float layer's consumer may quantize its output itself). Without it, the
    search switches fake-quant off, as the sweep does.
    """
    all_groups = groups(model)
    names = only or list(all_groups)
    unknown = [n for n in names if n not in all_groups]
    if unknown:
        raise QatkitError(f"sensitivity: no quantizer group {unknown[0]!r} ({len(unknown)} unknown); "
                          "groups are module paths or op keys, as `qatkit inspect` lists the quantizers")
    keys = set().union(*all_groups.values())
    with kept_layers(model):  # the sweep only switches quantizers: each layer's weight follows the switches
        try:
            _enable(model, set())
            report = SensitivityReport(metric(model), 0.0, metric=metric_name)
            _enable(model, None)
            report.quantized_metric = metric(model)
            for name in progress_bar(names, "sensitivity", quiet):
                mine = set(all_groups[name])
                _enable(model, mine)
                only_q = metric(model)
                _enable(model, keys - mine)
                report.groups.append(GroupResult(name, len(mine), only_q, metric(model)))
            report.groups.sort(key=lambda g: g.all_but, reverse=True)
            if target is not None:
                report.target = target * report.float_metric if relative else target
                report.keep_float, report.reached = _budget(model, metric, report, all_groups, keys, requantize,
                                                            quiet)
        finally:
            _enable(model, None)
    return report


def _budget(model: nn.Module, metric: Metric, report: SensitivityReport, all_groups: dict[str, list[str]],
            keys: set[str], requantize, quiet: bool) -> tuple[list[str], float]:
    """Greedy: keep float the group that buys most, then the next, until ``metric >= report.target``."""
    keep: list[str] = []
    value = report.quantized_metric
    for g in progress_bar(report.groups, "budget", quiet):
        if value >= report.target:
            break
        keep.append(g.group)
        if requantize is not None:
            value = metric(requantize(list(keep)))
        else:
            _enable(model, keys - set().union(*(all_groups[k] for k in keep)))
            value = metric(model)
    return keep, value


def keep_float_recipe(recipe: dict, keep_float: list[str]) -> dict:
    """``recipe`` (a dict, e.g. ``{"base": "onnxruntime"}``) plus ``skip`` rules for the kept-float groups.

    A group is a module path or a functional op key, both of which ``module_name`` rules name exactly; the model
    input's quantizer (group ``input0``...) is switched off with ``quantize_model_input: false``.
    """
    out = dict(recipe)
    rules = list(out.get("rules", []))
    for g in keep_float:
        if is_input_quantizer(g):
            out["quantize_model_input"] = False
        else:
            rules.append({"module_name": g, "skip": True})
    out["rules"] = rules
    return out
