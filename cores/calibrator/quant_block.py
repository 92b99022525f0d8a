"""Old path of :mod:`cores.quantization.block`, kept for code outside the repo; ``cores`` imports the new one."""

from ..quantization.block import (CACHE_HOOKS, add_smoothers, freeze, init_smoothers, learnable_parameters,  # noqa: F401
                                  load_quant_state, quant_state_dict, quantize_block, smoothers)
