"""The contract of a placement policy: where activation quantizers go for one kind of inference runtime."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..capture import Edge, Node
from ..plan import within
from .builder import PlacementBuilder


class Policy(ABC):
    """One ``recipe.placement`` value. :func:`qatkit.placement.place` calls, in order:
    :meth:`place_model_inputs`, then :meth:`quantize_entries` and :meth:`place` for every node that is not kept
    float, then :meth:`concat_group` for each quantized concat (``share_concat_scales``), then
    :meth:`model_outputs`.

    Example usage::

        policy = POLICIES[recipe.placement](builder)
        policy.place(node)
    """

    name: ClassVar[str]  # the recipe's ``placement`` value

    def __init__(self, builder: PlacementBuilder) -> None:
        self.builder, self.facts, self.rules = builder, builder.facts, builder.rules

    def place_model_inputs(self) -> None:
        """Quantizers on the model inputs themselves (none by default)."""

    @abstractmethod
    def place(self, node: Node) -> None:
        """Quantizers at one node that the recipe does not keep float."""

    @abstractmethod
    def concat_group(self, node: Node) -> list[str]:
        """Quantizers to merge into one for a concat (its output and inputs); fewer than two: nothing to share."""

    @abstractmethod
    def model_outputs(self) -> list[str | None]:
        """The quantizer each model output carries (None: float)."""

    @abstractmethod
    def _quantized_before(self, edge: Edge) -> bool:
        """``edge`` already carries a quantizer, so a ``quantize_input`` boundary adds none."""

    @abstractmethod
    def _quantize_entry(self, node: Node, i: int, edge: Edge, module: str) -> None:
        """Quantize ``node``'s input ``i`` (``edge``), which enters ``module`` whose rule says ``quantize_input``."""

    def quantize_entries(self, node: Node) -> None:
        """Rule ``quantize_input``: tensors entering a module from outside are quantized at its boundary."""
        for i, edge in enumerate(node.inputs):
            if edge is None or self._quantized_before(edge):
                continue
            src_path = self.facts.name(self.facts.producer(edge))
            for module, types in self.rules.boundaries(node):
                if within(src_path, module) or not self.rules.quantizes_input(module, types):
                    continue
                self._quantize_entry(node, i, edge, module)
                break

    @staticmethod
    def concat_edges(node: Node) -> list[Edge]:
        """A concat's output, then its tensor inputs."""
        return [(node.key, 0)] + [e for e in node.inputs if e is not None]
