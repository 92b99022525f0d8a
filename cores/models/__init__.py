"""Model families (registered on import) and the streaming block-by-block runtime."""

from . import dense  # noqa: F401  (registers llama, qwen2, qwen3)
from . import deepseek, qwen3_moe  # noqa: F401  (registers deepseek_v3, deepseek_v32, qwen3_moe)
from . import qwen3_next, qwen3_vl  # noqa: F401  (registers qwen3_next, qwen3_5, qwen3_5_moe, qwen3_vl)
from .registry import ModelFamily, UnsupportedModelError, get_family, register_family, supported_model_types

__all__ = ["ModelFamily", "UnsupportedModelError", "get_family", "register_family", "supported_model_types"]
