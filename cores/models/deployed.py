"""Run a deployed (compressed-tensors) checkpoint through our own block forward.

:func:`load_deployed_block` rebuilds the frozen quantized block from the stored
integer codes and scales, with the very modules the fake-quant evaluation uses (its
linears ``PACKED``: they hold the codes and scales, no float weight), so
``eval_ppl.py --model DEPLOYED_DIR`` computes what ``--param_dir`` computed
before deploy. Static input and KV scales are taken as stored (the quantizers
below keep the stored scale instead of deriving it from a calibrated range).
:class:`~cores.models.streaming.StreamingModel` calls it for a deployed folder; it
reads the format (:mod:`cores.formats.compressed_tensors`), never the deploy stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from ..formats.compressed_tensors import DEPLOY_REPORT, KV_SCALE_NAMES, WEIGHT_NAMES, DeployedFormat, weight_codes
from ..quantization import FP8_E4M3_MAX, ActQuantizer, KVQuantizer, QuantLinear, QuantState, set_quant_state
from ..quantization.block import quantize_block
from ..utils.checkpoint import CheckpointError, CheckpointReader
from ..utils.io import changed_files, load_json
from .block_state import assign_state, read_state
from .registry import ModelFamily

log = logging.getLogger(__name__)


class DeployedModel(Protocol):
    """What :func:`load_deployed_block` reads of a :class:`~cores.models.streaming.StreamingModel`."""

    reader: CheckpointReader
    family: ModelFamily
    config: PretrainedConfig
    device: torch.device
    dtype: torch.dtype


class _StoredScale:
    """Mixin: a static quantizer whose scale (and zero point) are stored tensors, not derived from ``absmax``."""

    def load_scale(self, scale: Tensor, qmax: float, zero_point: Tensor | None = None) -> None:
        self.register_buffer("stored_scale", scale.detach().float().reshape(1).clone())
        z = torch.zeros_like(self.stored_scale) if zero_point is None else zero_point.detach().reshape(1).float()
        self.register_buffer("stored_zero_point", z)
        s = self.stored_scale  # the range it stands for (read by nothing but repr)
        self.absmax.copy_(s * qmax if zero_point is None else torch.cat(((z - self.qmin) * s, (qmax - z) * s)))

    def qparams(self) -> tuple[Tensor, Tensor]:
        return self.stored_scale, self.stored_zero_point


class StoredActQuantizer(_StoredScale, ActQuantizer):
    """Static per-tensor activation quantizer with a deployed ``input_scale`` (and ``input_zero_point``)."""

    def __init__(self, scale: Tensor, zero_point: Tensor | None = None):
        super().__init__(bits=8, mode="static", device=scale.device, symmetric=zero_point is None)
        self.load_scale(scale, self.qmax, zero_point)


class StoredKVQuantizer(_StoredScale, KVQuantizer):
    """KV-cache quantizer with a deployed ``k_scale`` / ``v_scale``."""

    def __init__(self, fmt: str, scale: Tensor):
        super().__init__(fmt, device=scale.device)
        self.load_scale(scale, FP8_E4M3_MAX if fmt == "fp8" else self.qmax)


def check_deployed_files(folder: Path) -> None:
    """Check every file that ``deploy_report.json`` records (size and checksum) against the folder.

    Raises:
        CheckpointError: naming the first file that changed since the deploy wrote it.
    """
    report = load_json(folder / DEPLOY_REPORT, CheckpointError, "Deploy the checkpoint again.")
    files = report.get("files")
    if files is None:
        log.warning("%s records no file checksums (written by an older deploy.py): its files are not checked",
                    folder / DEPLOY_REPORT)
        return
    for name, change in changed_files(folder, files):
        raise CheckpointError(f"{folder / name} {change}, as {DEPLOY_REPORT} records it: the deployed checkpoint "
                              "was modified or damaged; deploy it again (or copy it again from where it was written)")


def _take(stored: dict[str, Tensor], key: str, where: str) -> Tensor:
    if key not in stored:
        raise CheckpointError(f"{where} has no tensor {key!r}; the checkpoint does not match its quantization_config")
    return stored.pop(key)


def load_deployed_block(model: DeployedModel, idx: int) -> nn.Module:
    """Block ``idx`` of a deployed checkpoint, frozen, on ``model.device`` in ``model.dtype``.

    Args:
        model: A :class:`~cores.models.streaming.StreamingModel` over a compressed-tensors folder.
        idx: Block index.

    Returns:
        The quantized block; its forward takes ``(hidden, cos, sin)``.

    Raises:
        CheckpointError: When ``quantization_config`` is not one we deploy, or the
            block's tensors do not match it.
    """
    fmt = DeployedFormat.from_config(model.reader.config)
    scheme, targets = fmt.scheme, fmt.targets if fmt.overrides else None
    prefix = model.family.block_prefix(idx)
    where = f"block {idx} ({prefix}*) of {model.reader.model_dir}"
    stored = read_state(model.reader, prefix)
    with torch.device("meta"):
        block = model.family.build_block(model.config, idx)
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    own = {n: None if fmt.is_ignored(prefix + n) else fmt.targets.scheme_for(prefix + n) for n in linears}
    ignored = [n for n in linears if own[n] is None]
    codes: dict[str, tuple[Tensor, Tensor]] = {}
    input_scales: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name in linears:
        linear_scheme = own[name]
        if linear_scheme is None:
            continue
        codes[name] = weight_codes(stored, name + ".", linear_scheme.w_bits, where)
        for tensor_name in WEIGHT_NAMES[linear_scheme.w_bits]:
            del stored[f"{name}.{tensor_name}"]
        # the layer is loaded packed (below): its float weight is never made, and this stand-in (on the meta
        # device) only lets the state check hold the codes' shape against the one config.json implies
        stored[name + ".weight"] = torch.empty(codes[name][0].shape, dtype=model.dtype, device="meta")
        if linear_scheme.act_mode == "static":
            zero_point = None if linear_scheme.act_symmetric else _take(stored, name + ".input_zero_point", where)
            input_scales[name] = _take(stored, name + ".input_scale", where), zero_point
    kv_scales = {}
    if scheme.kv_bits is not None:
        for name, module in block.named_modules():
            for hook, scale_names in KV_SCALE_NAMES.items():
                if hasattr(module, hook):
                    scales = [_take(stored, ".".join(filter(None, (name, s))), where) for s in scale_names]
                    if any(not torch.equal(scales[0], other) for other in scales[1:]):
                        raise CheckpointError(f"{where}: {', '.join(scale_names)} of {name} differ; "
                                              "they are one scale of one cache")
                    kv_scales[(name, hook)] = scales[0]
    assign_state(block, stored, model.reader, prefix, where, "its config and quantization_config",
                 lambda key, tensor: tensor if tensor.is_meta else tensor.to(model.device, model.dtype))
    quantize_block(block, scheme, ignored, lwc=False, lac=False, targets=targets, prefix=prefix)
    for name, linear in block.named_modules():
        if name in input_scales:
            scale, zero_point = input_scales[name]
            linear.input_quantizer = StoredActQuantizer(
                scale.to(model.device), None if zero_point is None else zero_point.to(model.device))
    for (name, hook), scale in kv_scales.items():
        setattr(block.get_submodule(name), hook, StoredKVQuantizer(scheme.kv_format, scale.to(model.device)))
    for name, (q, scale) in codes.items():
        linear: QuantLinear = block.get_submodule(name)
        try:
            linear.load_packed(q.to(model.device), scale.to(model.device))
        except ValueError as err:
            raise CheckpointError(f"{where}: {prefix}{name}: {err}") from None
    set_quant_state(block, QuantState.FROZEN)  # the KV caches (the packed linears stay PACKED)
    return block.eval().requires_grad_(False)
