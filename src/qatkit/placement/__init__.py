"""Placement: from a captured graph and a recipe, decide where quantizers go and which tensors share one.

The recipe's ``placement`` picks a policy from :data:`POLICIES`:

* ``all_activations`` (ONNX Runtime, :mod:`.all_activations`): every activation tensor carries a quantizer.
* ``compute_inputs`` (TensorRT explicit Q/DQ, :mod:`.compute_inputs`): quantizers where compute reads int8, one
  per value.

Shared by both (:mod:`.builder`): a BatchNorm after a conv is folded into it; with ``share_concat_scales`` a concat's
inputs and output become one quantizer (:mod:`.sharing`, merged after placement), so neither TensorRT nor ORT has to
requantize around a concat. The head decode (``keep_head_decode_float``: every op after the last layer with
trainable weights, e.g. YOLO's DFL, anchor arithmetic and box decode; :mod:`.facts`) stays float, and
``keep_output_convs_float`` keeps those last layers float. Per-layer rules (``qatkit.recipes.rules``, looked up
per node by :mod:`.rules_lookup`) decide skip, boundary input/output quantization and the schemes.
"""
from __future__ import annotations

from torch import nn

from ..capture import Graph
from ..errors import RecipeError
from ..recipes import Recipe
from ..recipes.selectors import check_selectors
from .all_activations import AllActivations
from .builder import Placement, PlacementBuilder
from .compute_inputs import ComputeInputs
from .facts import GraphFacts
from .policy import Policy
from .rules_lookup import RuleLookup

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (AllActivations, ComputeInputs)}
# Without dataflow (a capture fallback) only conv/linear layers are known, with unknown inputs: their input and
# weight quantizers are all any policy can place, which is what compute_inputs does for such a node.
FALLBACK_POLICY: type[Policy] = ComputeInputs

__all__ = ["POLICIES", "Placement", "Policy", "place"]


def place(graph: Graph, recipe: Recipe, model: nn.Module) -> Placement:
    """Quantizers and sites for ``model`` under ``recipe`` (see the module docstring for the policies).

    Args:
        graph: the model's captured graph (:func:`qatkit.capture`).
        recipe: the validated recipe.
        model: the float model the graph was captured from.

    Raises:
        RecipeError: a ``skip`` entry or rule selector matches nothing in ``model`` (qatkit.recipes.selectors), or
            ``recipe.placement`` names no policy.
    """
    check_selectors(recipe, graph, model)
    if recipe.placement not in POLICIES:
        raise RecipeError(f"recipe placement {recipe.placement!r} is not a placement policy; "
                          f"use one of {', '.join(POLICIES)}")
    facts = GraphFacts(graph, model)
    rules = RuleLookup(recipe, facts)
    builder = PlacementBuilder(recipe, facts, rules)
    policy = (FALLBACK_POLICY if graph.fallback else POLICIES[recipe.placement])(builder)
    policy.place_model_inputs()
    for node in graph.nodes.values():
        if node.kind == "input":
            continue
        if rules.skipped(node):
            if facts.is_layer(node):
                builder.out.float_layers.append(node.key)
            continue
        policy.quantize_entries(node)
        policy.place(node)
    if recipe.share_concat_scales:
        for node in graph.nodes.values():
            if node.kind == "cat" and not rules.skipped(node):
                group = policy.concat_group(node)
                if len(group) > 1:
                    builder.groups.union(group)
    builder.merge_shared()
    builder.drop_empty_sites()
    builder.out.outputs = policy.model_outputs()  # the fallback graph has no outputs
    return builder.out
