"""Model families (registered on import) and the streaming block-by-block runtime."""

from . import dense  # noqa: F401  (registers llama, qwen2, qwen3)
from .registry import ModelFamily, UnsupportedModelError, get_family, register_family, supported_model_types

__all__ = ["ModelFamily", "UnsupportedModelError", "get_family", "register_family", "supported_model_types"]
