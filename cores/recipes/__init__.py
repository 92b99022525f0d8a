"""Quantization recipes: versioned YAML files that say what to quantize, how, and what stays in BF16."""

from .schema import (RECIPE_VERSION, Override, Recipe, RecipeError, Target, check_against_model, format_layer_ranges,
                     load_recipe, model_modules, parse_layer_ranges, parse_recipe)
from .select import builtin_names, builtin_path, builtin_recipe, recipe_name_for

__all__ = ["RECIPE_VERSION", "Override", "Recipe", "RecipeError", "Target", "builtin_names", "builtin_path",
           "builtin_recipe", "check_against_model", "format_layer_ranges", "load_recipe", "model_modules",
           "parse_layer_ranges", "parse_recipe", "recipe_name_for"]
