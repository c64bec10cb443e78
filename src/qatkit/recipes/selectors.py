"""Selectors that match nothing are errors: every ``skip`` regex and rule selector must name part of the model.

A typo in a recipe (``module_name: stem.conv`` for ``stem.cv``, ``object_type: Conv2D``) would otherwise leave the
layer quantized and say nothing, as NNCF's ``IgnoredScope(validate=True)`` also refuses. What "matches" means is
exactly what placement uses, :func:`qatkit.recipes.rules.matches`, tried against:

* every module path of ``model.named_modules()``, with the class names of the module and its parents. A rule that
  names an existing module is accepted even if that module holds no quantizable layer (a ReLU, a container that
  never runs): the recipe is then merely without effect there, not wrong;
* every node of the captured graph as the placer sees it: a functional op by its key (``stage1.0/add#0``) with its
  op kind and name (``add``, ``__add__``), the model inputs by kind ``input``.

A rule that sets ``quantize_input``/``quantize_output`` must also match a module *boundary* (``exact``, as the
placer applies them): a submodule or functional op itself, not only through its parents. The root module has no
boundary (``quantize_model_input``/``quantize_model_outputs`` cover it).

When capture fell back to module level (``Graph.fallback``), functional ops are unknown, so a selector that can
only name one (an op kind such as ``add``, a name or regex with ``/`` or ``#``) is not checked; capture has
already warned.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from ..capture import Graph
from ..errors import RecipeError
from ..plan import module_of
from ..tracing import _FUNC_KINDS  # the functional op names and kinds capture knows, for the fallback case
from .rules import Rule, matches
from .schema import Recipe

_OP_WORDS = set(_FUNC_KINDS) | set(_FUNC_KINDS.values()) | {"input", "other"}
_HINT = "a selector that matches nothing is a typo or a rule for another model: fix the name or remove it"


@dataclass(frozen=True)
class _Targets:
    """What selectors are matched against, as (path, type names) pairs, plus the names to suggest from."""

    layers: list[tuple[str, list[str]]]  # every module path and graph node (rules.matches, not exact)
    boundaries: list[tuple[str, list[str]]]  # every submodule and functional op itself (exact)
    names: list[str]  # module paths and functional op keys
    types: list[str]  # module class names and functional op kinds/names


def _targets(graph: Graph, model: nn.Module) -> _Targets:
    # every name a module is registered under: a module shared by several parents is named after its caller
    classes = {name: type(m).__name__ for name, m in model.named_modules(remove_duplicate=False)}

    def lineage(path: str) -> list[str]:  # class names of the root and each module along ``path``, as the placer
        parts = path.split(".") if path else []
        return [classes[""]] + [classes[p] for p in (".".join(parts[: i + 1]) for i in range(len(parts)))
                                if p in classes]

    layers = [(name, lineage(name)) for name in classes]
    boundaries = [(name, [cls]) for name, cls in classes.items() if name]
    op_keys, op_types = [], set()
    for node in graph.nodes.values():
        if node.module is not None:  # a module call, named by its module path
            layers.append((node.module, lineage(node.module)))
            boundaries.append((node.module, lineage(node.module)[-1:]))
            continue
        path = "" if node.kind == "input" else node.key
        layers.append((path, lineage(module_of(path)) + [node.kind, node.op]))
        op_types |= {node.kind, node.op}
        if node.kind != "input":
            boundaries.append((node.key, [node.kind, node.op]))
            op_keys.append(node.key)
    names = list(dict.fromkeys([n for n in classes if n] + op_keys))
    return _Targets(layers, boundaries, names, sorted(set(classes.values()) | op_types))


def _selectors(skip: list[str], rules: list[Rule]) -> list[tuple[str, Rule]]:
    """(label, rule) for every ``skip`` entry (a module_name_regex skip rule, as placement reads it) and rule."""
    return ([(f"skip entry {i}", Rule(module_name_regex=p, skip=True)) for i, p in enumerate(skip)]
            + [(f"rule {i}", r) for i, r in enumerate(rules)])


def _may_name_op(rule: Rule) -> bool:
    """Could this selector name a functional op (unknown after a capture fallback)?"""
    if rule.object_type is not None:
        return rule.object_type in _OP_WORDS
    text = rule.module_name if rule.module_name is not None else rule.module_name_regex
    return "/" in text or "#" in text


def _closest(rule: Rule, targets: _Targets) -> str:
    value = getattr(rule, rule.kind)
    if rule.kind == "object_type":
        pool, what = targets.types, "module classes and functional op kinds"
    else:
        pool, what = targets.names, "module paths and functional op keys"
        value = value.replace("\\", "")  # a regex's escaped dots should not hide a near miss
    close = difflib.get_close_matches(value, pool, n=3, cutoff=0.5)
    if close:
        return f"closest {what}: {', '.join(map(repr, close))}"
    sample = pool if rule.kind == "object_type" else pool[:6]
    return f"no close match; the model's {what} include {', '.join(map(repr, sample[:12]))}"


def check_selectors(recipe: Recipe, graph: Graph, model: nn.Module) -> None:
    """Raise :class:`RecipeError` for the first ``skip`` entry or rule of ``recipe`` matching no part of ``model``.

    Args:
        recipe: the validated recipe (its ``skip`` regexes and ``rules``).
        graph: the captured graph placement will use (its functional op keys and kinds).
        model: the model being quantized (its module paths and class names).

    Raises:
        RecipeError: naming the entry (``rule 2``, ``skip entry 0``), its kind and value, and the closest names.

    Example:
        >>> import torch
        >>> from qatkit import capture
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
        >>> graph = capture(net, (torch.rand(1, 3, 4, 4),))
        >>> from qatkit import load_recipe
        >>> check_selectors(load_recipe({"base": "tensorrt", "skip": ["0"]}), graph, net)  # module "0" exists
        >>> check_selectors(load_recipe({"base": "tensorrt", "skip": ["O"]}), graph, net)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qatkit.errors.RecipeError: recipe skip entry 0 (module_name_regex: 'O') matches no layer of Sequential; ...
    """
    targets = _targets(graph, model)
    for label, rule in _selectors(recipe.skip, recipe.rules):
        if graph.fallback is not None and _may_name_op(rule):
            continue
        where = f"recipe {label} ({rule.kind}: {getattr(rule, rule.kind)!r})"
        if not any(matches(rule, path, types) for path, types in targets.layers):
            swapped = (" (silu_to_relu replaced the SiLU modules by ReLU before placement)"
                       if recipe.silu_to_relu and rule.object_type == "SiLU" else "")
            raise RecipeError(f"{where} matches no layer of {type(model).__name__}{swapped}; "
                              f"{_closest(rule, targets)} ({_HINT})")
        if rule.quantize_input is None and rule.quantize_output is None:
            continue
        if not any(matches(rule, path, types, exact=True) for path, types in targets.boundaries):
            raise RecipeError(
                f"{where} sets quantize_input/quantize_output but names no submodule or functional op itself, "
                "only the whole model through its parents: these settings apply where tensors enter or leave a "
                "named module; use quantize_model_input/quantize_model_outputs for the model's own inputs and "
                "outputs, or name a submodule")
