"""Write a benchmark's figures into a doc page between its two marker lines, leaving the rest of the page alone."""
from __future__ import annotations

from pathlib import Path


def write_block(doc: Path, begin: str, end: str, lines: list[str], heading: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` with ``lines`` (markers kept); without the
    markers, append ``heading`` and the block at the end of the page.

    Example:
        >>> write_block(Path("/tmp/page.md"), "<!-- x:begin -->", "<!-- x:end -->", ["| a |"], "## X")
    """
    block = "\n".join([begin, *lines, end])
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n{heading}\n\n" + block + "\n"
    doc.write_text(text)
