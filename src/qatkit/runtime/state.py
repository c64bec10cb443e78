"""``QuantState``: the submodule ``model._qatkit`` of a quantized model, holding its quantizers and site plan."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..capture import Recorder
from ..plan import Site, site_table, slot
from ..quant.quantizer import FakeQuantizer
from .bias_shifts import BiasShifts
from .hooks import ModelHooks


class QuantState(nn.Module):
    """Quantizers, the site plan and the recipe of one quantized model (registered as ``model._qatkit``).

    Its ``state_dict`` holds ``quantizers.<name with ':' for '.'>.*``, ``bn_frozen`` and any bias shifts
    (``bias_shifts.<weight quantizer>``); the sites and recipe are
    plain data (:meth:`site_table`), stored beside it in checkpoints. :meth:`attach` installs the hooks
    (:class:`qatkit.runtime.hooks.ModelHooks`) that execute the plan.

    Example usage::

        state = QuantState(placement.sites, placement.quantizers, recipe_dict)
        model.add_module("_qatkit", state)
        state.attach(model)
    """

    silu_reads: dict[str, str] = {}  # (read-only defaults for states pickled before they existed)
    arity: dict[str, int] = {}

    def __init__(self, sites: dict[str, Site] | None = None, quantizers: dict[str, FakeQuantizer] | None = None,
                 recipe: dict | None = None, outputs: list[str | None] | None = None,
                 example_shapes: list[list[int]] | None = None, float_layers: list[str] | None = None) -> None:
        super().__init__()
        self.float_layers = float_layers or []  # conv/linear layers the recipe keeps float (lint, export metadata)
        self.outputs = outputs or []  # quantizer key per model output, None where the output is float
        self.example_shapes = example_shapes or []
        self.quantizers = nn.ModuleDict({slot(k): q for k, q in (quantizers or {}).items()})
        self.sites = sites or {}
        self.recipe = recipe or {}
        self.recorder: Recorder | None = None  # set by capture: the hooks report the dataflow to it
        self.known: set[str] = set()  # keys seen at capture (empty: don't check)
        # BN folding: "live" (train mode, not frozen) simulates the fold and lets BN use and update batch
        # statistics; frozen or eval uses running statistics, exactly the deployed conv. A buffer: saved, resumed.
        self.register_buffer("bn_frozen", torch.tensor(False))
        self._bn_frozen = False  # its Python mirror, what bn_live reads (FakeQuantizer's flags have them too)
        self.functional = True  # False after a capture fallback: module hooks only, no torch-function mode
        self.silu_reads: dict[str, str] = {}  # conv site -> the SiLU site that alone reads it (Placement.silu_reads)
        # functional site with input quantizers -> its tensor inputs at capture: a later call that disagrees means
        # the ops of that module's forward shifted (FunctionDispatch.check_arity)
        self.arity: dict[str, int] = {}
        self.bias_shifts = BiasShifts()  # bias correction's per-channel shifts, by weight quantizer (often none)
        self.tap: Callable[[FakeQuantizer, torch.Tensor], torch.Tensor] | None = None
        self._model_hooks: list[ModelHooks] = []

    def attach(self, root: nn.Module) -> None:
        """Install the hooks on ``root`` and all its submodules (except qatkit's own)."""
        object.__setattr__(self, "_root", root)  # not a submodule: the root owns this state, not the reverse
        self._model_hooks.append(ModelHooks(self, root))

    def detach(self) -> None:
        """Remove every hook :meth:`attach` installed."""
        for hooks in self._model_hooks:
            hooks.remove()
        self._model_hooks.clear()

    def forward(self, x=None, *args):
        """Identity: a root ``nn.Sequential`` calls every child, this one included; it must not change data."""
        return x

    def q(self, key: str) -> FakeQuantizer:
        """The quantizer named ``key``."""
        return self.quantizers[slot(key)]

    def bias_shift(self, weight_key: str) -> torch.Tensor | None:
        """The bias shift of the layer whose weight quantizer is ``weight_key`` (:mod:`qatkit.ptq.bias_correction`);
        None where none was set (or the state was pickled before shifts existed)."""
        shifts = self._modules.get("bias_shifts")
        return None if shifts is None or not shifts._buffers else shifts.get(weight_key)

    def module(self, path: str) -> nn.Module:
        """The submodule of the attached model at ``path`` (e.g. the BatchNorm a site folds)."""
        return self._root.get_submodule(path)

    def freeze_bn(self, frozen: bool = True) -> None:
        """Set ``bn_frozen`` (see :func:`qatkit.freeze`), the buffer and its mirror."""
        self.bn_frozen.fill_(bool(frozen))
        self._bn_frozen = bool(frozen)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """``load_state_dict``: the mirror follows the loaded ``bn_frozen`` (quantizers re-read their own)."""
        super()._load_from_state_dict(*args, **kwargs)
        self._bn_frozen = bool(self.bn_frozen)

    @property
    def bn_live(self) -> bool:
        """BatchNorm uses batch statistics (train mode, not frozen by :func:`qatkit.freeze`)."""
        return self._root.training and not self._bn_frozen

    def site_table(self) -> dict:
        """Plain-data copy of the sites, for checkpoints (kept out of state_dict: jit tracing needs tensors only)."""
        return site_table(self.sites)
