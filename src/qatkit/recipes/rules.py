"""Per-layer rules: which layers a recipe override applies to, and which override wins.

A rule names its layers one way: ``object_type`` (a module class name such as ``Conv2d`` or ``Head``, matching
that module and everything inside it, or a functional op such as ``add``/``cat``), ``module_name_regex`` (matched
in full against a layer's module path or any of its parents), or ``module_name`` (a module and its subtree).
Priority, lowest first, as in PyTorch's qconfig mapping and seed 001: the recipe's global settings <
``object_type`` < ``module_name_regex`` < ``module_name``. Among ``module_name`` rules the deeper module wins, and
otherwise a later rule wins over an earlier one. A functional op is named by its key (``stage1.0/add#0``, as
``qatkit inspect`` lists it); a rule naming its module covers it too.

``skip`` and the schemes apply to every layer a rule names (a module's whole subtree). ``quantize_input`` and
``quantize_output`` apply at the named module's boundary, as seed 001's per-stage configs do: ``quantize_input``
quantizes the tensors entering the module from outside, ``quantize_output: false`` leaves the tensors leaving it
(to the rest of the model or as model outputs) float. For a single layer the boundary is its own input/output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..plan import parse_key, within
from ..quant.scheme import QuantScheme

KINDS = ("object_type", "module_name_regex", "module_name")


class Rule(BaseModel):
    """One override. ``activation``/``weight`` hold only the keys to change (e.g. ``{bits: 4}``)."""

    model_config = ConfigDict(extra="forbid")

    object_type: str | None = None
    module_name_regex: str | None = None
    module_name: str | None = None
    skip: bool | None = None  # keep these layers float
    quantize_input: bool | None = None  # True: tensors entering the module are quantized at its boundary
    quantize_output: bool | None = None  # False: tensors leaving the module stay float
    activation: dict | None = None
    weight: dict | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> "Rule":
        chosen = [k for k in KINDS if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"a rule needs exactly one of {', '.join(KINDS)}; got {chosen or 'none'}")
        if self.module_name_regex is not None:
            try:
                re.compile(self.module_name_regex)
            except re.error as e:
                raise ValueError(f"module_name_regex {self.module_name_regex!r} is not a valid regex: {e}") from e
        for field in ("activation", "weight"):
            override = getattr(self, field)
            if override is not None:  # name an unknown key or bad value now, not at placement
                try:
                    QuantScheme.model_validate(override)
                except ValidationError as e:
                    problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                    raise ValueError(f"{field}: {problems} (valid keys: {', '.join(QuantScheme.model_fields)})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)


@dataclass(frozen=True)
class Resolved:
    """The settings that apply to one layer after all matching rules."""

    skip: bool
    activation: QuantScheme
    weight: QuantScheme


def _prefixes(path: str) -> list[str]:
    """``a.b`` -> ``[a, a.b]``; a functional op key ``a.b/add#0`` -> ``[a, a.b, a.b/add#0]``."""
    key = parse_key(path)
    parts = key.scope.split(".") if key.scope else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))] + ([path] if key.op is not None else [])


def matches(rule: Rule, path: str, types: list[str], exact: bool = False) -> bool:
    """``path``: the layer's module path; ``types``: class names of it and its parents, plus a functional op kind.

    ``exact``: the rule must name this module itself (``types`` then holds only its own class/op names), not a
    parent: used for the boundary settings.
    """
    if rule.object_type is not None:
        return rule.object_type in types
    if rule.module_name_regex is not None:
        return any(re.fullmatch(rule.module_name_regex, p) for p in ([path] if exact else _prefixes(path)))
    name = rule.module_name
    return path == name or (not exact and within(path, name))


def _ordered(rules: list[Rule], path: str, types: list[str], exact: bool = False) -> list[Rule]:
    order = {k: i for i, k in enumerate(KINDS)}
    hits = [(order[r.kind], len(r.module_name or ""), i, r) for i, r in enumerate(rules)
            if matches(r, path, types, exact)]
    return [h[-1] for h in sorted(hits, key=lambda h: h[:3])]


def boundary(rules: list[Rule], path: str, types: list[str]) -> tuple[bool, bool]:
    """(quantize_input, quantize_output) at the boundary of the module ``path`` (rules naming it exactly)."""
    quantize_input, quantize_output = False, True
    for r in _ordered(rules, path, types, exact=True):
        quantize_input = r.quantize_input if r.quantize_input is not None else quantize_input
        quantize_output = r.quantize_output if r.quantize_output is not None else quantize_output
    return quantize_input, quantize_output


def resolve(rules: list[Rule], activation: QuantScheme, weight: QuantScheme, path: str,
            types: list[str]) -> Resolved:
    skip = False
    act, wt = activation.model_dump(), weight.model_dump()
    for r in _ordered(rules, path, types):
        skip = r.skip if r.skip is not None else skip
        act.update(r.activation or {})
        wt.update(r.weight or {})
    return Resolved(skip, QuantScheme.model_validate(act), QuantScheme.model_validate(wt))
