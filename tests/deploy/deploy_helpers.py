"""Helpers of the deploy tests: param dirs as ``main.py`` writes them, and our forward's logits."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from cores.calibrator.params import ParamDir
from cores.quantization.block import learnable_parameters, quant_state_dict, quantize_block
from cores.models.hidden_store import HiddenStore
from cores.models.run import BlockTransform, embed, run_blocks
from cores.models.streaming import StreamingModel
from cores.quantization import DEFAULT_IGNORE, QuantScheme, QuantState, set_quant_state
from cores.utils.checkpoint import model_fingerprint

SEQ = 16
GROUP = 32
"""W4 group size of the tests (the tiny models' hidden size is 64)."""

TEXT = " ".join(f"The {a} {b} of the {c} was {d}." for a in ("old", "young", "quiet", "bright")
                for b in ("king", "river", "city", "song") for c in ("north", "sea", "hill") for d in ("seen", "kept"))


def make_params(model_dir: Path, out: Path, scheme: QuantScheme, seed: int = 0, rounding: bool = False,
                smooth: bool = False) -> ParamDir:
    """A param dir as ``main.py`` writes it: calibrated on random inputs, clipping logits (and rounding offsets,
    log smoothing scales) moved off their init."""
    model = StreamingModel(model_dir, dtype=torch.float32)
    params = ParamDir(out)
    params.bind({"model_fingerprint": model_fingerprint(model.reader), "model_type": model.config.model_type,
                 "num_blocks": model.num_blocks, "dump": {}, "scheme": asdict(scheme), "lwc": True, "lac": True,
                 "ignore": list(DEFAULT_IGNORE), "train_mode": "block", "rtn": False, "sequential": False,
                 "rounding": rounding, "smooth": smooth})
    gen = torch.Generator().manual_seed(seed)
    cos, sin = model.rotary(SEQ)
    for idx in range(model.num_blocks):
        block = quantize_block(model.load_block(idx), scheme, DEFAULT_IGNORE, True, True, rounding=rounding,
                               smooth=smooth)
        set_quant_state(block, QuantState.CALIBRATE)
        with torch.no_grad():
            for _ in range(2):
                block(torch.randn(2, SEQ, model.hidden_size, generator=gen), cos, sin)
            for param in learnable_parameters(block):
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
        params.save_block(idx, quant_state_dict(block), {"block": idx})
    return params


def editable_copy(deployed: Path, dst: Path) -> Path:
    """A copy of a deployed folder without its ``deploy_report.json``, whose file records would refuse an edited
    shard before the loader's own checks see it."""
    shutil.copytree(deployed, dst, ignore=shutil.ignore_patterns("deploy_report.json"))
    return dst


def logits(model_dir: Path, ids: torch.Tensor, transform: BlockTransform | None = None) -> torch.Tensor:
    """fp32 logits of our streaming forward (fake-quant with ``transform``; deployed folders load quantized)."""
    model = StreamingModel(model_dir, dtype=torch.float32)
    with HiddenStore((*ids.shape, model.hidden_size), torch.float32) as store:
        embed(model, ids, store, len(ids))
        run_blocks(model, store, len(ids), block_transform=transform)
        return model.final_norm()(store.read(0, len(ids))) @ model.lm_head_weight().T
