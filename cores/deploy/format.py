"""Old path of :mod:`cores.formats.compressed_tensors`, kept for code outside the repo; ``cores`` imports the new one."""

from ..formats.compressed_tensors import (FORMAT_BY_BITS, KV_SCALE_NAMES, QUANT_METHOD, WEIGHT_NAMES,  # noqa: F401
                                          DeployedFormat, dequantize_codes, ignore_match, quantization_config,
                                          weight_codes)
