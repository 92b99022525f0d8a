"""``fp8``: a BF16 checkpoint -> FP8 e4m3 weights with one ``weight_scale_inv`` per 128x128 tile, shard by shard.

The layout is DeepSeek-V3's, which vLLM and SGLang load as ``quant_method: fp8``:
every eligible weight ``N.weight`` becomes ``float8_e4m3fn`` with ``N.weight_scale_inv``
(fp32, ``[ceil(out/128), ceil(in/128)]``, ``weight ~ fp8 * scale_inv``) beside it in the same
shard; every other tensor passes through as stored. ``config.json`` gets

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": [...]}

with every 2-D weight left in bf16 named in ``modules_to_not_convert`` (module names, as
vLLM's ``Fp8Config`` matches them). Output shards carry the names and tensors of the
input shards; each is written a run of tile rows at a time (codes and their scale rows
together), so memory is one run's buffers plus the memory-mapped source, whatever the
model. Scales per tile follow :mod:`cores.quantization.fp8_block` (``max``, ``rms``,
``percentile``, ``mse``, optionally weighted by activation statistics of a calibration
dump, :mod:`cores.deploy.fp8_stats`).

Eligibility (one table for every family): a weight converts when it is a 2-D float
``.weight`` of a decoder block ``model.layers.<i>`` with ``i < num_hidden_layers`` whose
module name matches no pattern below; everything else stays as stored.

| kept in bf16                          | pattern (module name)            | families                     |
|---------------------------------------|----------------------------------|------------------------------|
| embeddings, ``lm_head``               | outside the blocks               | all                          |
| norms                                 | ``norm$`` (1-D anyway)           | all                          |
| MoE router gates                      | ``.mlp.gate$``                   | deepseek_v3/v32, qwen3_moe, qwen3_next |
| shared-expert gate                    | ``shared_expert_gate$``          | qwen3_next (qwen2_moe style) |
| small low-rank projections            | ``indexer.weights_proj$``, ``linear_attn.in_proj_ba$`` | deepseek_v32, qwen3_next |
| SSM parameters                        | ``A_log``, ``dt_bias``, ``conv1d`` (not 2-D linears) | qwen3_next |
| vision tower                          | ``visual.`` (outside the text blocks) | qwen3_vl                |
| MTP layer (its ``eh_proj`` fusion and all) | layers ``>= num_hidden_layers`` | deepseek_v3/v32           |
| fused siblings off the tile grid      | ``q/k/v_proj``, ``gate/up_proj``, ``q_a_proj/kv_a_proj_with_mqa`` where a member before the last has an out dim not a multiple of 128 | all (SmolLM2: q 576 rows) |

The last row is for serving: vLLM loads each such group as one merged weight (``qkv_proj`` ...)
whose 128-row tile scales would straddle the members (the vLLM measurement: ``docs/defaults.md``).

The MTP layer passes through whole (its linears listed by full name), as the
quantized deploys do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..quantization import Workspace
from ..quantization.fp8_block import Fp8BlockConfig, channel_weights, iter_quantize_fp8_block, scale_grid
from ..utils.checkpoint import SCALE_INV_SUFFIX, CheckpointReader
from .export import AS_STORED, Entry, Passthrough, source_entry
from .fp8_stats import ActStats
from .verify import WeightCheck
from .writer import DeployError, ShardedWriter, StagedOutput, TensorSpec

log = logging.getLogger(__name__)

FP8_KEEP: tuple[str, ...] = (
    r"norm$",
    r"\.mlp\.gate$",
    r"shared_expert_gate$",
    r"\.indexer\.weights_proj$",
    r"\.linear_attn\.in_proj_ba$",
    r"(^|\.)visual\.",
)
"""Module-name patterns kept in bf16 inside the decoder blocks (the table of the module docstring)."""

FP8_FUSED: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
"""Sibling linears that vLLM loads as one merged weight (``qkv_proj``, ``gate_up_proj``, ``fused_qkv_a_proj``),
in merge order: their tile rows must line up in the merged weight."""


def _layer_of(key: str, layer_prefix: str) -> int | None:
    head, _, rest = key.partition(layer_prefix)
    idx = rest.split(".", 1)[0]
    return int(idx) if not head and idx.isdigit() else None


@dataclass
class Fp8Plan:
    """Which weights of a source convert.

    Attributes:
        converted: Full names of the weights that become FP8 (``...q_proj.weight``).
        kept: Module names of the 2-D weights left in bf16 (``modules_to_not_convert``).
    """

    converted: list[str]
    kept: list[str]


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _misaligned_groups(reader: CheckpointReader, candidates: list[str], block_rows: int) -> set[str]:
    """The members of every :data:`FP8_FUSED` group among ``candidates`` where a member before the last has an
    out dim that is not a multiple of ``block_rows``: merged, the next member would start inside a tile row."""
    present = set(candidates)
    out = set()
    for key in candidates:
        parent, _, leaf = key.removesuffix(".weight").rpartition(".")
        for group in FP8_FUSED:
            if leaf != group[0]:
                continue
            members = [f"{parent}.{m}.weight" for m in group if f"{parent}.{m}.weight" in present]
            if any(reader.spec(m)[1][0] % block_rows for m in members[:-1]):
                out.update(members)
    return out


def plan_fp8(reader: CheckpointReader, layer_prefix: str = "model.layers.", block: tuple[int, int] = (128, 128)
             ) -> Fp8Plan:
    """The weights that convert and those kept (see the module's table).

    Raises:
        DeployError: When the source is already quantized (FP8 or compressed-tensors), or nothing converts.
    """
    qcfg = reader.config.get("quantization_config") or {}
    if reader.is_fp8:
        raise DeployError(f"{reader.model_dir} is already an FP8 checkpoint (weight_scale_inv tiles): there is "
                          "nothing to quantize. To recalibrate its scales, dequantize it first with "
                          "--quant_type bfloat16 and deploy fp8 from that")
    if qcfg:
        raise DeployError(f"{reader.model_dir} is already quantized (quant_method {qcfg.get('quant_method')!r}); "
                          "deploy fp8 from the BF16 model")
    num_layers = int(_text_config(reader.config).get("num_hidden_layers", 0))
    keep = re.compile("|".join(FP8_KEEP))
    converted, kept = [], []
    for key in reader.keys:
        dtype, shape = reader.spec(key)
        if not key.endswith(".weight") or len(shape) != 2 or not dtype.is_floating_point:
            continue
        module = key.removesuffix(".weight")
        layer = _layer_of(key, layer_prefix)
        if layer is not None and layer < num_layers and not keep.search(module):
            converted.append(key)
        else:
            kept.append(module)
    misaligned = _misaligned_groups(reader, converted, block[0])
    if misaligned:
        log.warning("fp8: %d linears stay bf16 (e.g. %s): vLLM merges them with their siblings (%s), and an out "
                    "dim that is not a multiple of %d would put tile scales across the merge", len(misaligned),
                    min(misaligned).removesuffix(".weight"),
                    ", ".join("/".join(g) for g in FP8_FUSED if any(k.endswith(f".{g[0]}.weight")
                                                                   for k in misaligned)), block[0])
        converted = [k for k in converted if k not in misaligned]
        kept += [k.removesuffix(".weight") for k in misaligned]
    if not converted:
        raise DeployError(f"{reader.model_dir} has no weight that fp8 converts (2-D linears of the blocks under "
                          f"{layer_prefix!r})")
    return Fp8Plan(converted, sorted(kept))


def fp8_config(config: dict, plan: Fp8Plan, cfg: Fp8BlockConfig) -> dict:
    """``config.json`` with the FP8 ``quantization_config`` (the official DeepSeek / Qwen FP8 layout)."""
    out = dict(config)
    out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(cfg.block), "modules_to_not_convert": plan.kept}
    return out


def _fp8_entry(reader: CheckpointReader, key: str, cfg: Fp8BlockConfig, stats: ActStats | None, check: bool,
               workspace: Workspace) -> Entry:
    """``key`` as e4m3 codes and ``key_scale_inv``, a run of tile rows at a time, checked while written."""
    dtype, shape = reader.spec(key)
    specs = [TensorSpec(key, torch.float8_e4m3fn, shape),
             TensorSpec(key + SCALE_INV_SUFFIX, torch.float32, scale_grid(*shape, cfg.block))]

    def write(writer: ShardedWriter) -> None:
        weight = reader.read([key])[key]  # a view of the memory-mapped shard
        mean_square = None if stats is None else stats.get(key)
        act = None if mean_square is None or cfg.mode == "max" else channel_weights(mean_square)
        weight_check = None if not check else WeightCheck(
            key.removesuffix(".weight"), 8, workspace, fmt="fp8", peak_weight=None if act is None else act.sqrt())
        runs = iter_quantize_fp8_block(weight, cfg, act, error_stats=weight_check is not None,
                                       peak_weight=None if weight_check is None else weight_check.peak_weight)
        for run in runs:
            if weight_check is not None:
                if run.stats is not None:  # the native kernel's aggregates
                    weight_check.add_stats(run.stats)
                for cols, source, error in run.pieces:  # the torch path's error
                    weight_check.update_error(source, error, cols)
                if run.rows.stop == shape[0]:
                    writer.add_check(key, weight_check.result())
            writer.write(key, run.codes)
            writer.write(key + SCALE_INV_SUFFIX, run.scale_inv)

    return Entry(specs, write)


def export_fp8(reader: CheckpointReader, staged: StagedOutput, plan: Fp8Plan, cfg: Fp8BlockConfig,
               stats: ActStats | None = None, check: set[str] | None = None,
               passthrough: Passthrough = AS_STORED) -> dict[str, str]:
    """Write the FP8 shards (one per input shard, same names); shards recorded as done are skipped.

    Args:
        reader: The BF16 source.
        staged: The staged output.
        plan: What converts (:func:`plan_fp8`).
        cfg: How the tile scales are chosen.
        stats: Activation statistics (activation-aware scales), or None.
        check: Weights to verify (None: all converted).
        passthrough: The dtype of the tensors that stay unconverted.

    Returns:
        The weight map of the written index.
    """
    converted = set(plan.converted)
    check = converted if check is None else set(check)
    workspace = Workspace()
    shards = []
    for shard in sorted(set(reader.weight_map.values())):
        keys = [k for k, f in reader.weight_map.items() if f == shard]
        entries = []
        plain = [k for k in keys if k not in converted]
        if plain:
            entries.append(source_entry(reader, plain, passthrough=passthrough))
        entries += [_fp8_entry(reader, k, cfg, stats, k in check, workspace) for k in keys if k in converted]
        shards.append((shard, entries))
    specs = [(shard, [s for e in entries for s in e.specs]) for shard, entries in shards]
    with ShardedWriter(staged, specs) as writer, tqdm(shards, unit="shard") as bar:
        for i, (_, entries) in enumerate(bar):
            bar.set_description(f"shard {i + 1}/{len(shards)}: fp8 {cfg.describe()}")
            for entry in entries:
                if any(writer.wanted(s.name) for s in entry.specs):
                    entry.write(writer)
        return writer.finish()
