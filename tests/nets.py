"""Small test networks shared by several test files (import as ``from nets import ...``: tests/ is on sys.path)."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Conv -> SiLU, module paths ``conv`` and ``act``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class ModeShy(nn.Module):
    """A forward that cannot run under a torch-function mode (as some custom-kernel wrappers refuse it): capture
    falls back to module level, with no functional ops in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if torch._C._is_torch_function_mode_enabled():
            raise RuntimeError("fused kernel wrapper: torch-function modes are not supported")
        return self.b(y + 1.0)
