"""Write a serving checkpoint (compressed-tensors, or FP8 128x128 blocks) from FP weights, or dequantize FP8 to BF16.

Examples:
    python deploy.py --input_weight_path assets/smollm2-135m --param_dir outputs/params_w8a8c8 \
        --output_weight_path outputs/smollm2-w8a8c8 --quant_type w8a8c8
    python deploy.py --input_weight_path DeepSeek-V3 --output_weight_path DeepSeek-V3-bf16 --quant_type bfloat16
    python deploy.py --input_weight_path assets/smollm2-135m --output_weight_path outputs/smollm2-fp8 \
        --quant_type fp8 --fp8_mode mse --calib_dir outputs/calib

Without --param_dir the weights are rounded to nearest and activations are
dynamic per token; static activations and 8-bit KV caches need the calibrated
scales of a param dir (``main.py --rtn`` makes one without training). A
verification report is logged and written to ``deploy_report.json`` in the output.
"""

from __future__ import annotations

import logging

from ..deploy import DeployConfig, deploy, quant_types
from ..quantization.fp8_block import FP8_MODES
from ..utils.logging import setup_logging
from . import at_least, check_output_folder, command_parser, config_from_args, run_main

log = logging.getLogger("deploy")


def parse_args(argv: list[str] | None = None) -> DeployConfig:
    p = command_parser(__doc__)
    p.add_argument("--input_weight_path", "--model", dest="input_weight_path",
                   help="FP model folder (bf16 or FP8); required, here or in --config")
    p.add_argument("--output_weight_path", "--output_dir", dest="output_weight_path",
                   help="folder to create; required, here or in --config")
    p.add_argument("--quant_type", "--scheme", dest="quant_type",
                   help=f"one of {', '.join(quant_types())}; required, here or in --config")
    p.add_argument("--param_dir", help="learned params from main.py (default: round-to-nearest)")
    p.add_argument("--mla_param_path", help="params of --train_mode mla, when kept apart from --moe_param_path")
    p.add_argument("--moe_param_path", help="params of --train_mode moe, when kept apart from --mla_param_path")
    p.add_argument("--act", choices=["static", "dynamic"],
                   help="activation scales (default: the param dir's; dynamic without one)")
    p.add_argument("--kv_format", choices=["int8", "fp8"], help="8-bit KV cache format (default: the param dir's)")
    p.add_argument("--act_format", choices=["int8", "fp8"],
                   help="activation codes (default: the param dir's, else int8); fp8 needs dynamic activations "
                        "and a w4 scheme")
    p.add_argument("--group_size", type=at_least(1), help="W4 group size (default: the param dir's, else 128)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype of the float tensors written unquantized (embeddings, norms, lm_head, biases; with "
                        "bfloat16 the dequantized weights too) and of config.json; auto (default): as stored")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder")
    p.add_argument("--verify_samples", type=at_least(1),
                   help="verify N quantized tensors drawn at random (default: all)")
    p.add_argument("--max_shard_size", help="output shard size limit (default: 5GB)")
    p.add_argument("--fp8_mode", choices=list(FP8_MODES),
                   help="fp8: tile scales from the absmax (max, default), k x rms (rms), a percentile of |w| "
                        "(percentile) or the least squared error over a grid of clips (mse)")
    p.add_argument("--fp8_k", type=float, help="fp8 rms: the clip in tile rms units (default: 6)")
    p.add_argument("--fp8_percentile", type=float, help="fp8 percentile: the clip's percentile of |w| (default: 99.99)")
    p.add_argument("--fp8_grid", type=at_least(1), help="fp8 mse: clip factors tried (default: 20, 0.5 to 1)")
    p.add_argument("--calib_dir",
                   help="fp8: calibration dump (extract_calib_data.py); weights each tile's error by the "
                        "activation mean square of its input channels (rms, percentile, mse)")
    a = p.parse_args(argv)
    cfg = config_from_args(DeployConfig, a)
    check_output_folder("--output_weight_path", cfg.output_weight_path)
    return cfg


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(parse_args(argv)), log)


def _run(cfg: DeployConfig) -> int:
    result = deploy(cfg)
    print(result.line())
    return 1 if result.verify["FAIL"] else 0

