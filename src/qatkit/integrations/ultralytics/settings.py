"""What the QAT trainer needs beyond ultralytics' own arguments: the recipe and the calibration.

Ultralytics validates its arguments against its own list (``get_cfg`` rejects unknown keys), so these travel as a
:class:`QatSettings` bound to the trainer class (:meth:`QatDetectionTrainer.configured`) or passed to its
constructor, never through ``overrides``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import RecipeError
from ...quant.calibrators import CALIBRATORS
from ...recipes import Recipe, load_recipe, recipe_to_dict


@dataclass(frozen=True)
class QatSettings:
    """Recipe and calibration of a QAT run inside ultralytics' trainer.

    Args:
        recipe: a built-in recipe name (``qatkit.builtin_recipes()``), a recipe YAML path, a dict or a Recipe.
        calib_batches: calibration steps, each one global training batch (``batch`` images split over the ranks).
        calib_method: calibrator for every activation quantizer (max, ema, percentile, mse, entropy); None: the
            recipe's own.
        bias_correction: after calibration, :func:`qatkit.correct_bias` on up to 8 of the calibration batches.

    Example:
        >>> QatSettings("tensorrt", calib_batches=16).recipe_name
        'tensorrt'
    """

    recipe: str | Path | dict | Recipe = "onnxruntime"
    calib_batches: int = 8
    calib_method: str | None = None
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise RecipeError(f"calib_batches must be an int >= 1 (calibration steps), got {self.calib_batches!r}")
        if self.calib_method is not None and self.calib_method not in CALIBRATORS:
            raise RecipeError(f"unknown calib_method {self.calib_method!r}: choose one of "
                              f"{', '.join(sorted(CALIBRATORS))}, or None for the recipe's own")
        load_recipe(self.recipe)  # an unknown name or a bad file fails here, before any data is loaded

    @property
    def recipe_name(self) -> str:
        """The recipe's name (a built-in name, a YAML file's stem, or ``custom``)."""
        return recipe_to_dict(load_recipe(self.recipe)).get("name", "custom")

    def describe(self) -> dict:
        """Plain data for logs and checkpoints (the recipe by name; the checkpoint stores the full recipe)."""
        return {**asdict(self), "recipe": self.recipe_name}
