"""The site-key grammar of qatkit.plan and the placement policy registry."""
from __future__ import annotations

import pytest

from qatkit.placement import POLICIES
from qatkit.plan import Key, module_of, parse_key, quantizer_owner, within
from qatkit.recipes.schema import Recipe


@pytest.mark.parametrize("key, parsed", [
    ("", Key("")),
    ("stage1.0.conv", Key("stage1.0.conv")),
    ("stage1.0@2", Key("stage1.0", 2)),
    ("stage1.0/add#0", Key("stage1.0", 0, "add", 0)),
    ("head.cv2@1/__getitem__#12", Key("head.cv2", 1, "__getitem__", 12)),
    ("input#0", Key("input#0")),  # a model-input node key: no op part
])
def test_parse_key_round_trip(key: str, parsed: Key) -> None:
    assert parse_key(key) == parsed
    assert str(parsed) == key


def test_parse_key_names_the_grammar() -> None:
    with pytest.raises(ValueError, match=r"name#n"):
        parse_key("stage1.0/add")


def test_module_of_within_and_owner() -> None:
    assert module_of("a.b@1/add#0") == "a.b"
    assert within("a.b/add#0", "a.b") and within("a.b.c", "a.b") and not within("a.bc", "a.b")
    assert quantizer_owner("a.b/add#0/output") == "a.b/add#0" and quantizer_owner("input0") == "input0"


def test_every_recipe_placement_has_a_policy() -> None:
    assert set(POLICIES) == set(Recipe.model_fields["placement"].annotation.__args__)
