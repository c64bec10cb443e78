"""Recipes are data: a validated description of where quantizers go and what they do.

Built-ins live next to this file as YAML; a user recipe is a YAML file or dict that may extend one with
``base: <name>`` and override any key. Every unknown key or value is an error naming it and the valid choices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import RecipeError
from ..quant.scheme import QuantScheme
from .rules import Rule

RECIPE_DIR = Path(__file__).parent
# Recipe format versions this qatkit reads. Bump VERSION when a key changes meaning; an older version that can still
# be read then stays listed here (and is converted on load), one that cannot gets its own error naming the fix.
VERSION = 1
VERSIONS = (1,)


class Recipe(BaseModel):
    """Where quantizers go (``placement``) and what they do (``activation``, ``weight``).

    placement:
      * ``all_activations``: every activation tensor is quantized (conv/linear/add/mul/cat/sigmoid outputs,
        model inputs), shape-only ops (max-pool, nearest upsample, reshape, split) pass their input's scale
        through. Lets ONNX Runtime run the whole graph in int8.
      * ``compute_inputs``: quantize only the inputs of conv/linear layers (TensorRT-style explicit Q/DQ).
    """

    model_config = ConfigDict(extra="forbid")

    version: int = VERSION  # the recipe format; optional, a newer one than this qatkit reads is an error
    name: str = "custom"
    description: str = ""
    activation: QuantScheme
    weight: QuantScheme
    placement: Literal["all_activations", "compute_inputs"]
    keep_output_convs_float: bool = False  # the last trainable conv/linear layers (the head's outputs) stay float
    # ops after the last trainable layer (YOLO's DFL, anchors, box decode, post-processing) stay float: seeds 000/002
    # dequantize before the detection decode; box coordinates in 8 bits would cost accuracy and speed nothing
    keep_head_decode_float: bool = True
    share_concat_scales: bool = False  # all_activations: a concat's inputs and output use one quantizer
    silu_to_relu: bool = False  # seed 002: NPUs without SiLU; nn.SiLU modules and F.silu calls become ReLU
    # all_activations computes SiLU as x * q(sigmoid(x)). "unit": q takes the sigmoid's own range [0, 1] (fixed,
    # never calibrated, as PyTorch's fixed-qparams sigmoid); "calibrate": q is calibrated like any activation
    silu_sigmoid_range: Literal["calibrate", "unit"] = "calibrate"
    quantize_model_input: bool = True
    quantize_model_outputs: bool = True  # False: the layers producing model outputs compute them in high precision
    # export: a float Softmax over a non-last axis (YOLOv8's DFL) is written as ReduceMax/Sub/Exp/ReduceSum/Div,
    # which ONNX Runtime's CPU runs 6x faster (qatkit.export.softmax); same function, numerically within 1e-6
    decompose_softmax: bool = False
    skip: list[str] = []  # module-name regexes kept float (shorthand for rules with skip: true)
    rules: list[Rule] = []  # per-layer overrides, see qatkit.recipes.rules for matching and priority


    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        valid = ", ".join(map(str, VERSIONS))
        if isinstance(value, int) and not isinstance(value, bool) and value > VERSION:
            raise ValueError(f"recipe version {value} is newer than this qatkit reads (versions: {valid}): "
                             "upgrade qatkit (pip install -U qatkit)")
        if isinstance(value, bool) or value not in VERSIONS:
            raise ValueError(f"unknown recipe version {value!r}; valid versions: {valid}")
        return value

    @model_validator(mode="after")
    def _weights_track_their_tensor(self) -> "Recipe":
        if self.weight.scale_mode != "fixed" or any((r.weight or {}).get("scale_mode", "fixed") != "fixed"
                                                    for r in self.rules):
            raise ValueError("weight.scale_mode must be 'fixed': weight scales follow the current weights at every "
                             "step (per-channel max); scale_mode 'ema'/'learned' applies to activations")
        return self


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _resolve(data: dict, seen: tuple[str, ...] = ()) -> dict:
    base = data.pop("base", None)
    if base is None:
        return data
    if base in seen:
        raise RecipeError(f"recipe 'base' chain loops: {' -> '.join(seen + (base,))}")
    if base not in builtin_recipes():
        raise RecipeError(f"unknown base recipe {base!r}; built-in recipes: {', '.join(builtin_recipes())}")
    parent = _resolve(_read_yaml(RECIPE_DIR / f"{base}.yaml"), seen + (base,))
    return _merge(parent, data)


def _model_in(annotation):
    """The pydantic model inside ``list[X]`` / ``X | None`` / ``X`` (for naming valid keys)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = Recipe
            for p in e["loc"][:-1]:
                if isinstance(p, int):  # list index: the list's item model
                    continue
                field = getattr(parent, "model_fields", {}).get(str(p))
                parent = _model_in(field.annotation) if field is not None else parent
            valid = ", ".join(getattr(parent, "model_fields", {}).keys())
            lines.append(f"unknown key {where!r}; valid keys here: {valid}")
        else:
            msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
            lines.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "; ".join(lines)


def load_recipe(recipe: "str | Path | dict | Recipe") -> Recipe:
    """A built-in name, a YAML path, a dict or a Recipe -> validated Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        data, name = dict(recipe), recipe.get("name", "custom")
    elif isinstance(recipe, (str, Path)) and Path(recipe).suffix in (".yaml", ".yml"):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        data, name = _read_yaml(path), path.stem
    elif isinstance(recipe, str):
        if recipe not in builtin_recipes():
            raise RecipeError(
                f"unknown recipe {recipe!r}; built-in recipes: {', '.join(builtin_recipes())} "
                "(or give a path to a .yaml recipe)"
            )
        data, name = _read_yaml(RECIPE_DIR / f"{recipe}.yaml"), recipe
    else:
        raise RecipeError(f"a recipe is a name, a .yaml path, a dict or a Recipe, not {type(recipe).__name__}")
    data = _resolve(data)
    data.setdefault("name", name)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"invalid recipe {name!r}: {_format_errors(e)}") from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
