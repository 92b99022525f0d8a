"""``bfloat16``: dequantize a DeepSeek-layout FP8 checkpoint, one input shard at a time.

Each output shard holds the tensors of the input shard of the same name, every
FP8 weight multiplied out with its 128x128 ``weight_scale_inv`` to bf16 (the
scales dropped), every other tensor unchanged. Memory: one output shard (twice
its FP8 input) plus one tensor.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..utils.checkpoint import SCALE_INV_SUFFIX, CheckpointReader
from .writer import DeployError, StagedOutput


def fp8_weights(reader: CheckpointReader) -> list[str]:
    """Names of the weights stored with a ``weight_scale_inv``."""
    return [k for k in reader.keys if reader.has(k + SCALE_INV_SUFFIX)]


def bf16_config(config: dict) -> dict:
    """``config.json`` without the FP8 ``quantization_config``, with a bf16 dtype."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    for key in [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]:
        out[key] = "bfloat16"
    return out


def export_bf16(reader: CheckpointReader, staged: StagedOutput) -> dict[str, str]:
    """Write the dequantized shards; shards recorded as done are skipped.

    Raises:
        DeployError: When the source holds no FP8 weight.

    Returns:
        The weight map of the written index.
    """
    if not fp8_weights(reader):
        raise DeployError(f"{reader.model_dir} holds no FP8 weights (no *{SCALE_INV_SUFFIX} tensors): "
                          "bfloat16 converts FP8 checkpoints; this one can be used as it is")
    shards = sorted(set(reader.weight_map.values()))
    with tqdm(shards, unit="shard") as bar:
        for i, shard in enumerate(bar):
            bar.set_description(f"shard {i + 1}/{len(shards)}: bfloat16")
            if i >= staged.units_done:
                keys = [k for k, f in reader.weight_map.items() if f == shard and not k.endswith(SCALE_INV_SUFFIX)]
                staged.write_shard(shard, {k: reader.read([k])[k] for k in keys}, i + 1)  # FP8 freed per tensor
    return staged.write_index()
