"""Model families (registered on import) and the streaming block-by-block runtime."""

from . import dense  # noqa: F401  (registers llama, qwen2, qwen3)
from . import deepseek, qwen3_moe  # noqa: F401  (registers deepseek_v3, deepseek_v32, qwen3_moe)
from .registry import ModelFamily, UnsupportedModelError, get_family, register_family, supported_model_types

__all__ = ["ModelFamily", "UnsupportedModelError", "get_family", "register_family", "supported_model_types"]
