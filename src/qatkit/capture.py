"""Capture: learn a model's dataflow by running it once, without touching its code.

Every leaf module call (conv, BN, activation, pool...) and every functional op in other modules' ``forward``
(``x + y``, ``torch.cat``, ``chunk``, ``F.interpolate``...) becomes a :class:`Node` with the producers of its
tensor inputs. Because capture runs the real ``forward`` in eager mode, data-dependent control flow that stops
torch.fx is simply executed; the graph describes the path the example inputs took.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .plan import input_key
from .tracing import func_kind, func_name, module_kind

Edge = tuple[str, int]  # (producer node key, output index)


@dataclass
class Node:
    key: str
    kind: str
    op: str
    module: str | None = None  # qualified name of a leaf module, None for functional ops
    inputs: list[Edge | None] = field(default_factory=list)  # one per tensor input; None = constant/parameter
    num_outputs: int = 0


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    outputs: list[Edge] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)  # every op/module key that ran (nodes keep only dataflow ops)
    fallback: str | None = None  # why dataflow capture failed: the graph then lists conv/linear modules only

    @classmethod
    def modules_only(cls, model: nn.Module, reason: str) -> "Graph":
        """Module-level fallback: each conv/linear leaf as a node with unknown inputs (no dataflow)."""
        graph = cls(fallback=reason)
        for name, module in model.named_modules():
            kind = module_kind(module)
            if kind in ("conv", "linear") and name:
                graph.nodes[name] = Node(name, kind, type(module).__name__, name, [None], 1)
        return graph

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes.values():
            counts[n.kind] = counts.get(n.kind, 0) + 1
        return counts


def tensors_of(obj) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class Recorder:
    """Collects nodes and tensor provenance while :class:`qatkit.runtime.QuantState` runs in record mode."""

    def __init__(self) -> None:
        self.graph = Graph()
        self._producer: dict[int, Edge] = {}
        self._alive: list[torch.Tensor] = []  # keep recorded tensors alive so their ids stay unique

    def _edges(self, tensors: Sequence[torch.Tensor]) -> list[Edge | None]:
        return [self._producer.get(id(t)) for t in tensors]

    def _outputs(self, key: str, out) -> int:
        outs = tensors_of(out)
        for i, t in enumerate(outs):
            self._producer[id(t)] = (key, i)
            self._alive.append(t)
        return len(outs)

    def inputs(self, args) -> None:
        tensors = tensors_of(args)
        for i, t in enumerate(tensors):
            key = input_key(i)
            self.graph.nodes[key] = Node(key, "input", "input", num_outputs=1)
            self._producer[id(t)] = (key, 0)
            self._alive.append(t)

    def module_call(self, key: str, name: str, module: nn.Module, args) -> None:
        self.graph.seen.add(key)
        self.graph.nodes[key] = Node(key, module_kind(module), type(module).__name__, name,
                                     self._edges(tensors_of(args)))

    def module_return(self, key: str, out) -> None:
        if key in self.graph.nodes:
            self.graph.nodes[key].num_outputs = self._outputs(key, out)

    def function(self, key: str, func, args, kwargs, out) -> None:
        self.graph.seen.add(key)
        outs = tensors_of(out)
        if not outs:
            return  # size(), dim(), shape...: no dataflow
        ins = self._edges(tensors_of((args, kwargs)))
        if not any(e is not None for e in ins):
            return  # ops on constants only
        self.graph.nodes[key] = Node(key, func_kind(func, kwargs), func_name(func), None, ins)
        self.graph.nodes[key].num_outputs = self._outputs(key, out)

    def model_outputs(self, out) -> None:
        self.graph.outputs = [e for e in self._edges(tensors_of(out)) if e is not None]
