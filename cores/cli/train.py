"""Learn block-wise quantization parameters from a calibration dump.

Each block in [--start_block_idx, --end_block_idx) trains on its own: input = dumped
FP input of block i, target = dumped FP input of block i+1. Rerunning skips
finished blocks. Under torchrun each rank takes a disjoint share of the blocks. Example:

    python main.py --model assets/smollm2-135m --data_dir outputs/calib \
        --output_dir outputs/params_w8a8c8 --scheme w8a8c8 --epochs 5

MLA + MoE models can train the two halves of each block as separate jobs into one
param dir (the seed's flow): ``--train_mode mla --cls c8`` then
``--train_mode moe --cls bf16``, each on any block range.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from ..calibrator.params import TRAIN_MODES
from ..calibrator.train_config import ROUND_OPTIMIZERS, TRAIN_DTYPES, TrainConfig
from ..calibrator.trainer import run_training, summarize
from ..quantization import scheme_name, scheme_names
from ..utils.config import load_yaml
from ..utils.distributed import distributed
from ..utils.logging import setup_logging
from . import (UsageError, at_least, check_device, check_output_dir, command_parser, config_from_args, device_flag,
               run_main)

log = logging.getLogger("main")

SEED_SPELLINGS = ("w_bits", "a_bits", "cls", "q_bits", "k_bits", "v_bits")
"""The seed's flags: resolved into ``--scheme`` (:func:`scheme_from_bits`) or accepted and unused, no config
fields."""


def scheme_from_bits(w_bits: int | None, a_bits: int | None, cls: str | None) -> str | None:
    """The seed's ``--w_bits/--a_bits/--cls`` spelling as a scheme name."""
    if w_bits is None and cls is None:
        return None
    if a_bits not in (None, 8):
        raise UsageError(f"--a_bits {a_bits}: only 8-bit activations are supported")
    if cls not in (None, "c8", "bf16"):
        raise UsageError(f"--cls must be c8 or bf16, got {cls!r}")
    try:
        return scheme_name(w_bits or 8, kv=cls == "c8")
    except ValueError as err:
        raise UsageError(f"--w_bits {w_bits}: {err}") from None


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = command_parser(__doc__)
    p.add_argument("--model", help="FP model folder (bf16 or FP8)")
    p.add_argument("--data_dir", help="calibration dump from extract_calib_data.py")
    p.add_argument("--output_dir", help="param dir to write")
    p.add_argument("--scheme", choices=scheme_names(), help="quantization scheme (default w8a8c8)")
    p.add_argument("--recipe", help="recipe file (README, quantize.py): its scheme, options, ignore list, per-target "
                                    "overrides and training options, under --config and the flags")
    p.add_argument("--act", choices=["static", "dynamic"], help="activation scales (default dynamic)")
    p.add_argument("--act_format", choices=["int8", "fp8"],
                   help="activation codes (default int8); fp8: float8-e4m3 per token, with --act dynamic and a "
                        "w4 scheme (the W4A8 vLLM runs on GPU)")
    p.add_argument("--act_zero_point", action=argparse.BooleanOptionalAction,
                   help="with --act static: asymmetric int8 ranges, input_scale + input_zero_point (default off)")
    p.add_argument("--kv_format", choices=["int8", "fp8"], help="8-bit KV cache format (default fp8)")
    p.add_argument("--group_size", type=at_least(1), help="W4 group size along the input dim (default 128)")
    p.add_argument("--lwc", action=argparse.BooleanOptionalAction, help="learn weight clipping (default on)")
    p.add_argument("--lac", action=argparse.BooleanOptionalAction,
                   help="learn activation / KV clipping (default on)")
    p.add_argument("--rounding", action=argparse.BooleanOptionalAction,
                   help="learn a rounding offset per weight, jointly with the clips (default on)")
    p.add_argument("--smooth", action=argparse.BooleanOptionalAction,
                   help="learned smoothing between each norm / v_proj / up_proj and the linears reading it, "
                        "SmoothQuant-initialised, folded into the checkpoint (default on; block mode)")
    p.add_argument("--smooth_lr", type=float, help="learning rate of the log smoothing scales (default 5e-3)")
    p.add_argument("--loss", choices=["norm_mse", "mse"],
                   help="block loss: norm_mse (default), the MSE after the norm that reads the block's output; "
                        "mse: on the raw residual stream")
    p.add_argument("--epochs", "--epoch", dest="epochs", type=at_least(0), help="epochs per block (default 5)")
    p.add_argument("--lr", "--base_lr", dest="lr", type=float,
                   help="learning rate of the activation / KV clipping (default 1e-2 static, 2e-3 dynamic)")
    p.add_argument("--lwc_lr", type=float, help="learning rate of the weight clipping (default 1e-2 W4, 2e-3 W8)")
    p.add_argument("--round_lr", type=float,
                   help="learning rate of the rounding offsets (default 1 / steps signed, 5e-3 with adam)")
    p.add_argument("--round_optimizer", choices=list(ROUND_OPTIMIZERS),
                   help="sign (default at W4): SignRound's signed gradient descent at 1 / steps, no optimizer "
                        "state; adam (default at W8): the rounding offsets in AdamW at --round_lr")
    p.add_argument("--weight_decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--batch_size", "--cali_bsz", dest="batch_size", type=at_least(1),
                   help="samples per step (default 1)")
    p.add_argument("--start_block_idx", type=at_least(0), help="first block (default 0)")
    p.add_argument("--end_block_idx", type=at_least(1), help="one past the last block (default: all)")
    p.add_argument("--train_mode", choices=list(TRAIN_MODES),
                   help="block: whole blocks (default); mla: the attention sub-block and its KV cache; "
                        "moe: the MLP sub-block, each routed expert on its own tokens")
    p.add_argument("--min_expert_tokens", type=at_least(0),
                   help="moe: routed experts with fewer calibration tokens keep RTN weights (default 32)")
    p.add_argument("--rtn", action="store_true", default=None, help="round-to-nearest params, no training")
    p.add_argument("--sequential", action="store_true", default=None,
                   help="inputs = outputs of the quantized blocks before (slower, compensates error)")
    p.add_argument("--dev", help="cpu, cuda:N, or N (default cpu)")
    p.add_argument("--dtype", choices=list(TRAIN_DTYPES),
                   help="compute dtype (default float32); bfloat16: hidden states, norms, attention and unquantized "
                        "layers in bf16 (less activation memory; for GPUs, slower on CPU), quantized linears, "
                        "learned tensors and the loss in fp32")
    p.add_argument("--seed", type=int, help="shuffling seed (default 0)")
    seed = p.add_argument_group("seed spellings", "accepted for compatibility; they map onto --scheme")
    seed.add_argument("--w_bits", type=int, choices=[4, 8])
    seed.add_argument("--a_bits", type=int)
    seed.add_argument("--cls", choices=["c8", "bf16"],
                      help="c8: 8-bit KV cache, bf16: none (applies to block and mla; moe has no cache)")
    for name in ("--q_bits", "--k_bits", "--v_bits"):
        seed.add_argument(name, type=int, choices=[8], help="KV bits are set by --cls")
    a = p.parse_args(argv)
    from_bits = scheme_from_bits(a.w_bits, a.a_bits, a.cls)
    if from_bits and a.scheme and from_bits != a.scheme:
        p.error(f"--scheme {a.scheme} contradicts --w_bits/--cls ({from_bits})")
    a.scheme = a.scheme or from_bits
    cfg = config_from_args(TrainConfig, a, base=_recipe_options(a.recipe, a.config, a.model),
                           skip=("recipe", *SEED_SPELLINGS))
    check_output_dir("--output_dir", cfg.output_dir)
    return dataclasses.replace(cfg, device=check_device(device_flag(a), cfg.device)), a


def _recipe_options(recipe_path: str | None, yaml_path: str | None, model: str | None) -> dict | None:
    """The training options of ``--recipe`` (below ``--config`` and the flags), or None without one."""
    if not recipe_path:
        return None
    from ..recipes.flow import training_recipe

    model = model or (load_yaml(yaml_path) if yaml_path else {}).get("model")
    if not model:
        raise UsageError("missing required option --model: --recipe needs it to check the recipe's targets")
    recipe = training_recipe(recipe_path, model)
    if recipe.bf16_layers:
        log.warning("%s: bf16_layers %s are not trained or deployed by main.py: restore them after deploy.py "
                    "with scripts/mix_bf16.py, or run quantize.py --recipe", recipe_path, list(recipe.bf16_layers))
    return recipe.train_options()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(parse_args(argv)[0]), log)


def _run(cfg: TrainConfig) -> int:
    with distributed() as ranks:
        params = run_training(cfg, ranks)
        if ranks.rank != 0:
            return 0
    print(summarize(params))
    return 0

