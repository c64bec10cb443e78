"""The recipe's settings for each node of a captured graph: schemes, skip, and module-boundary quantization."""
from __future__ import annotations

from ..capture import Node
from ..recipes import Recipe
from ..recipes.rules import Resolved, Rule, boundary, resolve
from .facts import GraphFacts


class RuleLookup:
    """Per-node answers from ``recipe``'s global settings, ``skip`` entries and rules (qatkit.recipes.rules), cached.

    Example usage::

        rules = RuleLookup(recipe, facts)
        rules.rule(node).activation    # the activation scheme after every matching rule
        rules.skipped(node)            # kept float (a skip rule, or the head decode tail)
    """

    def __init__(self, recipe: Recipe, facts: GraphFacts) -> None:
        self.recipe, self.facts = recipe, facts
        self.rules = [Rule(module_name_regex=p, skip=True) for p in recipe.skip] + list(recipe.rules)
        self.tail = facts.decode_tail if recipe.keep_head_decode_float else set()
        self._resolved: dict[str, Resolved] = {}
        self._boundary: dict[tuple[str, tuple[str, ...]], tuple[bool, bool]] = {}

    def rule(self, node: Node) -> Resolved:
        """Recipe settings for ``node`` after its matching rules."""
        if node.key not in self._resolved:
            path = self.facts.name(node)  # an op is named by its key
            module = "" if node.kind == "input" else self.facts.module_path(node)
            types = [type(m).__name__ for m in self.facts.owners(module)]
            types += [node.kind, node.op] if node.module is None else []
            self._resolved[node.key] = resolve(self.rules, self.recipe.activation, self.recipe.weight, path, types)
        return self._resolved[node.key]

    def skipped(self, node: Node) -> bool:
        """Kept float: a rule skips it, or it is part of the head decode kept float by the recipe."""
        return node.key in self.tail or self.rule(node).skip

    def boundaries(self, node: Node) -> list[tuple[str, list[str]]]:
        """(module path, own type names) of the node itself and every module that contains it, innermost first."""
        facts = self.facts
        path = facts.module_path(node)
        own = [(path, [facts.type_name(path)])] if node.module else [(node.key, [node.kind, node.op])]
        parts = path.split(".") if path else []
        outer = [".".join(parts[:i]) for i in range(len(parts) - (1 if node.module else 0), 0, -1)]
        return own + [(p, [facts.type_name(p)]) for p in outer]

    def _at(self, module: str, types: list[str]) -> tuple[bool, bool]:
        cache_key = (module, tuple(types))
        if cache_key not in self._boundary:
            self._boundary[cache_key] = boundary(self.rules, module, types)
        return self._boundary[cache_key]

    def quantizes_input(self, module: str, types: list[str]) -> bool:
        """A rule's ``quantize_input: true`` names ``module`` itself."""
        return self._at(module, types)[0]

    def keeps_output_float(self, module: str, types: list[str]) -> bool:
        """A rule's ``quantize_output: false`` names ``module`` itself."""
        return not self._at(module, types)[1]
