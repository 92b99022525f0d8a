"""Quantized export: every block becomes its deployed tensors, one block at a time.

For each block the quantized block is built exactly as the fake-quant evaluation
builds it (the quantizers of ``ParamDir.block_transform``, or round-to-nearest);
every :class:`QuantLinear` named ``N`` yields ``N.<name>`` for each of its
qparams (``weight``/``weight_packed``, ``weight_scale``, ``weight_shape``,
``input_scale``), every KV quantizer on an attention cache hook yields the scales
of :data:`~cores.formats.compressed_tensors.KV_SCALE_NAMES`, and every other tensor of the
block is passed through from the source as stored (FP8 dequantized to bf16), or in
``deploy.py --dtype``.
MoE experts are linears like any other, so their tensors keep their on-disk names
(``mlp.experts.<e>.gate_proj.weight`` ...). Tensors outside the blocks pass
through the same way, DeepSeek's multi-token-prediction layer included.

The layout is planned first, from every block built on the meta device (no
weight read): the tensors' names, dtypes and shapes, in the order they are made,
cut into shards. A scheme that does not fit the model (a group size that does not
divide a dim) is refused there, before anything is written. Then each block is
read as stored (bf16 stays bf16, a view of the memory-mapped shard) and each of
its weights is quantized once, a run of rows at a time: the codes go straight
into their shard and are checked against the source rows while both are in cache.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Set
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..formats.compressed_tensors import KV_SCALE_NAMES
from ..models.run import BlockTransform
from ..models.streaming import StreamingModel
from ..quantization import KVQuantizer, QuantLinear, QuantScheme, TargetSchemes, Workspace
from ..quantization.block import quantize_block
from ..quantization.smoothing import Smoother
from ..utils.checkpoint import SCALE_INV_SUFFIX, CheckpointReader
from .pack import iter_weight_qparams, weight_qparam_specs
from .verify import WeightCheck
from .writer import ShardedWriter, StagedOutput, TensorSpec, cut_into_shards, shard_names


@dataclass
class Entry:
    """Output tensors made together (one source tensor, one linear's qparams, one KV scale) and how."""

    specs: list[TensorSpec]
    write: Callable[[ShardedWriter], None]


@dataclass(frozen=True)
class Passthrough:
    """The dtype of the tensors a deploy writes unquantized (``deploy.py --dtype``).

    Attributes:
        dtype: what 16- and 32-bit float tensors are written in; None: as stored (FP8 weights that a
            ``bfloat16`` deploy dequantizes: bf16).
        keep: name suffixes written as stored whatever ``dtype`` says: FP8 scales and the tensors a
            family keeps in fp32 (DeepSeek's router bias).
    """

    dtype: torch.dtype | None = None
    keep: tuple[str, ...] = (SCALE_INV_SUFFIX,)

    def dtype_of(self, key: str, stored: torch.dtype) -> torch.dtype:
        """The dtype tensor ``key``, read as ``stored``, is written in."""
        if self.dtype is None or not stored.is_floating_point or stored.itemsize < 2 or key.endswith(self.keep):
            return stored
        return self.dtype


AS_STORED = Passthrough()


def source_entry(reader: CheckpointReader, keys: list[str], check: Set[str] = frozenset(),
                 passthrough: Passthrough = AS_STORED) -> Entry:
    """Source tensors ``keys`` as read (FP8 weights dequantized a few rows at a time), read together.

    Args:
        reader: The source.
        keys: Tensor names.
        check: Those of ``keys`` whose values to check (bf16 weights dequantized from FP8).
        passthrough: The dtype they are written in.
    """
    specs = []
    for key in keys:
        dtype, shape = reader.spec(key)
        specs.append(TensorSpec(key, passthrough.dtype_of(key, dtype), shape))
    cast = {s.name: s.dtype for s in specs}
    checks = {s.name: s for s in specs if s.name in check}

    def write(writer: ShardedWriter) -> None:
        rows = dict.fromkeys(checks, 0)
        weight_checks = {key: WeightCheck(key, 16) for key in checks}
        for key, piece in reader.iter_chunks([k for k in keys if writer.wanted(k)]):
            if key in weight_checks:
                weight_checks[key].update_values(piece)
                rows[key] += piece.shape[0]
                if rows[key] == checks[key].shape[0]:
                    writer.add_check(key, weight_checks[key].result())
            writer.write(key, piece.to(cast[key]))

    return Entry(specs, write)


def _tensor_entry(name: str, tensor: Tensor) -> Entry:
    return Entry([TensorSpec.of(name, tensor)], lambda writer: writer.write(name, tensor))


def _linear_entry(name: str, linear: QuantLinear, check: bool, workspace: Workspace) -> Entry:
    """The qparams of ``linear`` (full name ``name``): codes streamed in runs of rows, then scales."""
    quantizer = linear.weight_quantizer
    inputs = {} if linear.input_quantizer is None else linear.input_quantizer.get_qparams()
    specs = [TensorSpec(f"{name}.{k}", dtype, shape) for k, (dtype, shape) in weight_qparam_specs(quantizer).items()]
    specs += [TensorSpec.of(f"{name}.{k}", v) for k, v in inputs.items()]

    def write(writer: ShardedWriter) -> None:
        weight_check = WeightCheck(name, quantizer.bits, workspace) if check else None
        rows = math.prod(quantizer.shape[:-1])
        for key, tensor, chunk in iter_weight_qparams(quantizer, linear.export_weight(), workspace):
            if chunk is not None and weight_check is not None:  # the codes written, as floats (W4: unpacked)
                weight_check.update(chunk.weight, chunk.levels, chunk.scale, overwrite=True)
                if chunk.rows.stop == rows:
                    writer.add_check(f"{name}.{key}", weight_check.result())
            writer.write(f"{name}.{key}", tensor)
        for key, tensor in inputs.items():
            writer.write(f"{name}.{key}", tensor)

    return Entry(specs, write)


def block_entries(block: nn.Module, prefix: str, reader: CheckpointReader, check: Set[str] = frozenset(),
                  workspace: Workspace | None = None, passthrough: Passthrough = AS_STORED) -> list[Entry]:
    """The deployed tensors of a quantized block (real, or on the meta device for the plan), in output order.

    Args:
        block: The block after the quantizing transform.
        prefix: Its name prefix (``model.layers.3.``).
        reader: The source, for the tensors passed through.
        check: Full names of the linears to verify.
        workspace: Scratch buffers of the chunked quantization (keep one for every block).
        passthrough: The dtype of the float tensors written unquantized (norms, biases, routers ...).
    """
    workspace = Workspace() if workspace is None else workspace
    linears = {name: m for name, m in block.named_modules() if isinstance(m, QuantLinear)}
    rewritten = _smoothed_tensors(block)
    replaced = {f"{prefix}{name}.weight" for name in linears} | {prefix + name for name in rewritten}
    entries = [source_entry(reader, [key for key in reader.keys_with_prefix(prefix) if key not in replaced],
                            passthrough=passthrough)]
    entries += [_tensor_entry(prefix + name, tensor.to(passthrough.dtype_of(prefix + name, tensor.dtype)))
                for name, tensor in rewritten.items()]
    for name, module in block.named_modules():
        if name in linears:
            entries.append(_linear_entry(prefix + name, module, prefix + name in check, workspace))
        for hook, scale_names in KV_SCALE_NAMES.items():
            quantizer = getattr(module, hook, None)
            if isinstance(quantizer, KVQuantizer):
                scale = quantizer.get_qparams()["scale"]
                entries += [_tensor_entry(prefix + ".".join(filter(None, (name, s))), scale) for s in scale_names]
    return entries


def _smoothed_tensors(block: nn.Module) -> dict[str, Tensor]:
    """The float tensors smoothing rewrote, by block-relative name: norm weights and smoothed biases."""
    out = {}
    with torch.no_grad():
        for name, module in block.named_modules():
            if isinstance(getattr(module, "smooth", None), Smoother):
                out[f"{name}.weight"] = module.smoothed_weight(export=True).to(module.smooth.dtype)
            elif isinstance(module, QuantLinear) and module.export_bias() is not None:
                out[f"{name}.bias"] = module.export_bias()
    return out


def _is_router(module: nn.Module) -> bool:
    """An MoE router: a module of its own with a 2-D ``weight`` (a ``Linear`` in the serving engines)."""
    weight = module._parameters.get("weight")
    return not isinstance(module, nn.Linear) and weight is not None and weight.dim() == 2


def _specs(entries: list[Entry]) -> list[TensorSpec]:
    return [spec for entry in entries for spec in entry.specs]


def _layer_of(key: str, model: StreamingModel) -> int | None:
    """The layer index of ``key`` (``model.layers.<i>.*``), or None for a tensor outside the layers."""
    head, _, rest = key.partition(model.family.layer_prefix)
    idx = rest.split(".", 1)[0]
    return int(idx) if not head and idx.isdigit() else None


def _outside_units(model: StreamingModel, passthrough: Passthrough) -> tuple[list[tuple[str, Entry]], list[str]]:
    """Units for the tensors outside the decoder blocks, passed through as read, and the linears among them.

    One unit per top-level tensor (embeddings, final norm, ``lm_head``) and one per
    extra layer beyond ``num_hidden_layers`` (DeepSeek's multi-token-prediction
    layer): not part of the model that runs, so not quantized, and its linears
    are listed for the ``ignore`` of ``quantization_config``.
    """
    reader = model.reader
    units, extra = [], {}
    for key in reader.keys:
        layer = _layer_of(key, model)
        if key.endswith(SCALE_INV_SUFFIX) or (layer is not None and layer < model.num_blocks):
            continue
        if layer is None:
            units.append((f"{key}: copy", source_entry(reader, [key], passthrough=passthrough)))
        else:
            extra.setdefault(layer, []).append(key)
    units += [(f"layer {layer} (after the last block): copy", source_entry(reader, keys, passthrough=passthrough))
              for layer, keys in sorted(extra.items())]
    linears = [key.removesuffix(".weight") for keys in extra.values() for key in keys
               if key.endswith(".weight") and len(reader.spec(key)[1]) == 2]
    return units, linears


@dataclass
class ExportPlan:
    """The planned output of a quantized deploy.

    Attributes:
        units: What to make, in order: ``(label, entry)``, one per tensor outside the blocks and one per block.
        quantized: Full names of the linears the scheme quantizes.
        kept: Full names of the linears left in high precision (``lm_head`` included).
        check: Full names of the linears to verify while they are written (default: all quantized).
        schemes: The scheme of each quantized linear, by full name.
    """

    units: list[tuple[str, Entry]] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    check: set[str] = field(default_factory=set)
    schemes: dict[str, QuantScheme] = field(default_factory=dict)


def plan_export(model: StreamingModel, scheme: QuantScheme, ignore: list[str], transform: BlockTransform,
                smooth: torch.dtype | None = None, targets: TargetSchemes | None = None,
                passthrough: Passthrough = AS_STORED) -> ExportPlan:
    """Every unit of a quantized deploy, with the tensors it makes; every block is built on the meta device.

    Args:
        model: The source.
        scheme: The scheme.
        ignore: Module-name patterns kept in high precision.
        transform: ``(idx, block) -> quantized block`` (learned params or round-to-nearest).
        smooth: the dtype of the transform's smoothers (the norm weights and biases they rewrite); None: none.
        targets: the per-target schemes the transform applies (None: ``scheme`` for every linear).
        passthrough: the dtype of the tensors written unquantized.

    Raises:
        ValueError: Naming the layer a scheme cannot take.
    """
    reader, family = model.reader, model.family
    plan = ExportPlan()
    plan.units, extra_linears = _outside_units(model, passthrough)
    plan.kept = [family.lm_head_key.removesuffix(".weight"), *extra_linears,
                 *(f"re:{re.escape(prefix)}.*" for prefix in family.passthrough)]  # a vision tower, as stored
    block_specs = []
    for idx in range(model.num_blocks):
        prefix = family.block_prefix(idx)
        with torch.device("meta"):
            block = quantize_block(family.build_block(model.config, idx), scheme, ignore, False, False,
                                   smooth=smooth is not None, smooth_dtype=smooth or torch.bfloat16,
                                   targets=targets, prefix=prefix)
        for name, module in block.named_modules():
            if isinstance(module, QuantLinear):
                plan.quantized.append(prefix + name)
                plan.schemes[prefix + name] = module.scheme
            elif isinstance(module, nn.Linear) or _is_router(module):
                plan.kept.append(prefix + name)
        block_specs.append(_specs(block_entries(block, prefix, reader, passthrough=passthrough)))
    plan.check = set(plan.quantized)
    workspace = Workspace()

    def write_block(idx: int, writer: ShardedWriter) -> None:
        prefix = family.block_prefix(idx)
        entries = block_entries(transform(idx, model.load_block(idx)), prefix, reader, plan.check, workspace,
                                passthrough)
        if _specs(entries) != block_specs[idx]:
            raise RuntimeError(f"block {idx}: the quantized block does not make the planned tensors")
        for entry in entries:
            if any(writer.wanted(spec.name) for spec in entry.specs):
                entry.write(writer)

    plan.units += [(f"block {idx + 1}/{model.num_blocks}: deploy", Entry(specs, lambda w, idx=idx: write_block(idx, w)))
                   for idx, specs in enumerate(block_specs)]
    return plan


def export_units(units: list[tuple[str, Entry]], staged: StagedOutput, max_shard_bytes: int) -> dict[str, str]:
    """Cut the planned tensors into shards and write every unit that still has tensors to write.

    Returns:
        The weight map of the written index.
    """
    shards = cut_into_shards([spec for _, unit in units for spec in unit.specs], max_shard_bytes)
    with ShardedWriter(staged, list(zip(shard_names(len(shards)), shards))) as writer, \
            tqdm(units, unit="unit") as bar:
        for label, unit in bar:
            bar.set_description(label)
            if any(writer.wanted(spec.name) for spec in unit.specs):
                unit.write(writer)
        return writer.finish()
