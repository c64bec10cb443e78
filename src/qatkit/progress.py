"""Progress bars that go quiet on request (``--quiet``) or when output is not a terminal-friendly log."""
from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, description: str, quiet: bool = False, total: int | None = None) -> tqdm:
    return tqdm(iterable, desc=description, disable=quiet, total=total, leave=False, dynamic_ncols=True)
