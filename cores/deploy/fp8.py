"""``bfloat16``: dequantize a DeepSeek-layout FP8 checkpoint, one input shard at a time.

Each output shard holds the tensors of the input shard of the same name, every
FP8 weight multiplied out with its 128x128 ``weight_scale_inv`` to bf16 (the
scales dropped), every other tensor unchanged (``--dtype``: both in that dtype instead). FP8 weights are converted and
written a few tile rows at a time: memory is a few buffers, whatever the shard.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from ..utils.checkpoint import SCALE_INV_SUFFIX, CheckpointReader
from .export import AS_STORED, Passthrough, source_entry
from .writer import DeployError, ShardedWriter, StagedOutput


def fp8_weights(reader: CheckpointReader) -> list[str]:
    """Names of the weights stored with a ``weight_scale_inv``."""
    return [k for k in reader.keys if reader.has(k + SCALE_INV_SUFFIX)]


def with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """``config`` declaring ``dtype`` (in ``torch_dtype``, and in ``dtype`` where newer transformers wrote it)."""
    out = dict(config)
    for key in [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]:
        out[key] = str(dtype).removeprefix("torch.")
    return out


def bf16_config(config: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``config.json`` without the FP8 ``quantization_config``, declaring ``dtype`` (bf16 unless ``--dtype``)."""
    return with_dtype({k: v for k, v in config.items() if k != "quantization_config"}, dtype)


def export_bf16(reader: CheckpointReader, staged: StagedOutput, check: Iterable[str] | None = None,
                passthrough: Passthrough = AS_STORED) -> dict[str, str]:
    """Write the dequantized shards; shards recorded as done are skipped.

    Args:
        reader: The FP8 source.
        staged: The staged output.
        check: Names of the FP8 weights to check (None: all).
        passthrough: The dtype of what is written (as stored: bf16 for the dequantized weights).

    Raises:
        DeployError: When the source holds no FP8 weight.

    Returns:
        The weight map of the written index.
    """
    fp8 = fp8_weights(reader)
    if not fp8:
        raise DeployError(f"{reader.model_dir} holds no FP8 weights (no *{SCALE_INV_SUFFIX} tensors): "
                          "bfloat16 converts FP8 checkpoints; this one can be used as it is")
    check = set(fp8 if check is None else check)
    shards = []
    for shard in sorted(set(reader.weight_map.values())):
        keys = [k for k, f in reader.weight_map.items() if f == shard and not k.endswith(SCALE_INV_SUFFIX)]
        if keys:
            shards.append((shard, source_entry(reader, keys, check, passthrough)))
    with ShardedWriter(staged, [(shard, entry.specs) for shard, entry in shards]) as writer, \
            tqdm(shards, unit="shard") as bar:
        for i, (_, entry) in enumerate(bar):
            bar.set_description(f"shard {i + 1}/{len(shards)}: bfloat16")
            entry.write(writer)
        return writer.finish()
