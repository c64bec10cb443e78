"""Scale sharing: quantizers that must end up as one (a concat's inputs and output), as a union-find."""
from __future__ import annotations


class ScaleGroups:
    """Union-find over quantizer names; each group is represented by the first name it was given.

    Example usage::

        groups = ScaleGroups()
        groups.union(["cat#0/output", "a/output", "b/output"])
        groups.find("b/output")        # -> "cat#0/output"
    """

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str | None) -> str | None:
        """The name representing ``name``'s group (``None`` stays ``None``)."""
        while name is not None and self.parent.get(name, name) != name:
            name = self.parent[name]
        return name

    def union(self, names: list[str]) -> None:
        """Put ``names`` in one group, represented by the first one's representative."""
        roots = [self.find(n) for n in names]
        for r in roots[1:]:
            if r != roots[0]:
                self.parent[r] = roots[0]
