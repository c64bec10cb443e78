"""Built-in recipes (YAML) and their schema."""
from .schema import Recipe, builtin_recipes, load_recipe, recipe_to_dict

__all__ = ["Recipe", "builtin_recipes", "load_recipe", "recipe_to_dict"]
