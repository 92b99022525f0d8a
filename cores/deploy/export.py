"""Quantized export: every block becomes its deployed tensors, one block at a time.

For each block the quantized block is built exactly as the fake-quant evaluation
builds it (the quantizers of ``ParamDir.block_transform``, or round-to-nearest); every
:class:`QuantLinear` named ``N`` yields ``N.<name>`` for each of its
``get_qparams()`` (``weight``/``weight_packed``, ``weight_scale``,
``weight_shape``, ``input_scale``), every KV quantizer on an attention cache hook
yields ``<attn>.k_scale`` / ``<attn>.v_scale``, and every other tensor of the
block is passed through from the source as stored (FP8 dequantized to bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calibrator.quant_block import quantize_block
from ..models.streaming import BlockTransform, StreamingModel
from ..quantization import KVQuantizer, QuantLinear, QuantScheme
from ..utils.checkpoint import SCALE_INV_SUFFIX
from .format import KV_SCALE_NAMES
from .writer import ShardWriter, StagedOutput

Unit = tuple[str, Callable[[], dict[str, Tensor]]]


def plan_linears(model: StreamingModel, scheme: QuantScheme, ignore: list[str]) -> tuple[list[str], list[str]]:
    """Full names of the linears that ``scheme`` quantizes and of those it leaves alone.

    Builds every block on the meta device (no weights read), so a scheme that
    does not fit the model (e.g. a group size that does not divide a dim) is
    refused before anything is written. ``lm_head`` always stays in high precision.

    Raises:
        ValueError: Naming the layer a scheme cannot take.
    """
    quantized, kept = [], [model.family.lm_head_key.removesuffix(".weight")]
    for idx in range(model.num_blocks):
        prefix = model.family.block_prefix(idx)
        with torch.device("meta"):
            block = quantize_block(model.family.build_block(model.config, idx), scheme, ignore, False, False)
        for name, module in block.named_modules():
            if isinstance(module, QuantLinear):
                quantized.append(prefix + name)
            elif isinstance(module, nn.Linear):
                kept.append(prefix + name)
    return quantized, kept


def block_tensors(model: StreamingModel, idx: int, transform: BlockTransform) -> dict[str, Tensor]:
    """The deployed tensors of block ``idx``, by full name."""
    prefix = model.family.block_prefix(idx)
    block = transform(idx, model.load_block(idx))
    out: dict[str, Tensor] = {}
    replaced = set()
    for name, module in block.named_modules():
        if isinstance(module, QuantLinear):
            replaced.add(f"{prefix}{name}.weight")
            out.update({f"{prefix}{name}.{k}": v.cpu() for k, v in module.get_qparams().items()})
        for hook, scale_name in KV_SCALE_NAMES.items():
            if isinstance(getattr(module, hook, None), KVQuantizer):
                out[f"{prefix}{name}.{scale_name}"] = getattr(module, hook).get_qparams()["scale"].cpu()
    kept = [k for k in model.reader.keys_with_prefix(prefix) if k not in replaced]
    return {**model.reader.read(kept), **out}


def _in_a_block(key: str, model: StreamingModel) -> bool:
    """Whether ``key`` belongs to one of the decoder blocks (not, e.g., to an extra MTP layer)."""
    head, _, rest = key.partition(model.family.layer_prefix)
    idx = rest.split(".", 1)[0]
    return not head and idx.isdigit() and int(idx) < model.num_blocks


def units(model: StreamingModel, transform: BlockTransform) -> Iterator[Unit]:
    """``(label, produce)`` for each tensor outside the blocks, then for each block."""
    for key in model.reader.keys:
        if not _in_a_block(key, model) and not key.endswith(SCALE_INV_SUFFIX):
            yield f"{key}: copy", lambda key=key: model.reader.read([key])
    for idx in range(model.num_blocks):
        yield f"block {idx + 1}/{model.num_blocks}: deploy", lambda idx=idx: block_tensors(model, idx, transform)


def export_quantized(model: StreamingModel, transform: BlockTransform, staged: StagedOutput,
                     max_shard_bytes: int) -> dict[str, str]:
    """Write every unit through a :class:`ShardWriter`; units recorded as done are skipped.

    Returns:
        The weight map of the written index.
    """
    writer = ShardWriter(staged, max_shard_bytes)
    plan = list(units(model, transform))
    with tqdm(plan, unit="unit") as bar:
        for i, (label, produce) in enumerate(bar):
            bar.set_description(label)
            if i >= staged.units_done:
                writer.add(i, produce())
    return writer.finish(len(plan))
