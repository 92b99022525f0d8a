"""Built-in recipes (``cores/recipes/builtin/*.yaml``), chosen by Hugging Face model id or by ``config.json``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from .schema import Recipe, RecipeError, load_recipe

BUILTIN_DIR = Path(__file__).parent / "builtin"

ID_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"deepseek-v3\.2", "deepseek_v32"),                       # V3.2, V3.2-Exp (sparse attention indexer)
    (r"deepseek-(v3|r1)", "deepseek_v3"),                      # V3, V3-0324, V3.1, V3.1-Terminus, R1, R1-0528
    (r"qwen3(-coder)?-\d+(\.\d+)?b-a\d+(\.\d+)?b", "qwen3_moe"),  # 30B-A3B, 235B-A22B, Coder-480B-A35B
    (r"qwen3", "qwen3"),                                       # dense Qwen3-0.6B ... 32B
    (r"smollm|llama", "llama"),
)
"""Model-id regex (searched, case-insensitive, in order: the first match wins) -> built-in recipe."""

ARCHITECTURES: Mapping[str, str] = {
    "DeepseekV32ForCausalLM": "deepseek_v32", "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen3MoeForCausalLM": "qwen3_moe", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
}
"""``config.json`` ``architectures[0]`` -> built-in recipe."""

MODEL_TYPES: Mapping[str, str] = {"deepseek_v32": "deepseek_v32", "deepseek_v3": "deepseek_v3",
                                  "qwen3_moe": "qwen3_moe", "qwen3": "qwen3", "llama": "llama"}
"""``config.json`` ``model_type`` -> built-in recipe."""


def builtin_names() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def builtin_path(name: str) -> Path:
    """The file of built-in recipe ``name``.

    Raises:
        RecipeError: For an unknown name (listing the valid ones).
    """
    path = BUILTIN_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"no built-in recipe {name!r}; built-in: {', '.join(builtin_names())}")
    return path


def recipe_name_for(model_id: str | None = None, config: Mapping | None = None) -> str:
    """The built-in recipe for a model: by its id first, else by ``architectures`` / ``model_type``.

    Args:
        model_id: A Hugging Face id such as ``deepseek-ai/DeepSeek-V3.1-Terminus`` (or a folder name).
        config: The model's ``config.json`` as a dict.

    Raises:
        RecipeError: When neither picks one.
    """
    if model_id:
        name = model_id.rstrip("/").split("/")[-1] if "/" in model_id else model_id
        for pattern, recipe in ID_PATTERNS:
            if re.search(pattern, name, re.IGNORECASE) or re.search(pattern, model_id, re.IGNORECASE):
                return recipe
    if config:
        for arch in config.get("architectures") or ():
            if arch in ARCHITECTURES:
                return ARCHITECTURES[arch]
        if config.get("model_type") in MODEL_TYPES:
            return MODEL_TYPES[config["model_type"]]
    raise RecipeError(f"no built-in recipe for model id {model_id!r} (architectures "
                      f"{(config or {}).get('architectures')}, model_type {(config or {}).get('model_type')!r}); "
                      f"pass --recipe FILE, or one of the built-in: {', '.join(builtin_names())}")


def builtin_recipe(model_id: str | None = None, config: Mapping | None = None) -> Recipe:
    """The parsed built-in recipe for a model (see :func:`recipe_name_for`)."""
    return load_recipe(builtin_path(recipe_name_for(model_id, config)))
