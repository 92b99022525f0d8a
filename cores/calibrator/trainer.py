"""Block-wise learned quantization: each block trains on its own from the dump.

Block ``i`` learns its clipping parameters so that its quantized output on the
dumped FP input of block ``i`` matches the dumped FP input of block ``i + 1``.
Blocks are independent jobs (any range, any order, any machine); with
``sequential`` the inputs are instead the outputs of the already-quantized
blocks before, which is slower but compensates accumulated error.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.streaming import HiddenStore, StreamingModel
from ..quantization import DEFAULT_IGNORE, QuantState, get_scheme, set_quant_state
from ..utils.checkpoint import model_fingerprint
from ..utils.distributed import Ranks
from .dump import DumpError, DumpManifest, HiddenDump, boundary_path
from .params import ParamDir
from .quant_block import freeze, learnable_parameters, load_quant_state, quant_state_dict, quantize_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one ``main.py`` run.

    Attributes:
        model: FP model folder (bf16 or FP8).
        data_dir: calibration dump from ``extract_calib_data.py``.
        output_dir: param dir.
        scheme: ``w8a8c16``, ``w8a8c8``, ``w4a8c16`` or ``w4a8c8``.
        act: ``static`` (per-tensor input scale, learnable clip) or ``dynamic`` (per-token).
        kv_format: ``int8`` or ``fp8`` for C8 schemes.
        group_size: W4 group size (default 128).
        lwc: learn weight clipping.
        lac: learn clipping of static activation / KV scales.
        epochs: passes over the calibration samples.
        lr: AdamW learning rate of the clipping logits.
        weight_decay: AdamW weight decay.
        batch_size: samples per step.
        start_block_idx: first block to train.
        end_block_idx: one past the last block (None: to the end).
        train_mode: ``block`` (the whole block jointly).
        rtn: write round-to-nearest params, no training.
        sequential: feed each block the output of the quantized blocks before it.
        device: ``cpu`` or ``cuda:N``.
        seed: shuffling seed.
        ignore: module patterns kept in high precision.
    """

    model: str
    data_dir: str
    output_dir: str
    scheme: str = "w8a8c8"
    act: str = "static"
    kv_format: str = "fp8"
    group_size: int | None = None
    lwc: bool = True
    lac: bool = True
    epochs: int = 5
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 1
    start_block_idx: int = 0
    end_block_idx: int | None = None
    train_mode: str = "block"
    rtn: bool = False
    sequential: bool = False
    device: str = "cpu"
    seed: int = 0
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)

    def __post_init__(self):
        if self.train_mode != "block":
            raise ValueError(f"train_mode {self.train_mode!r} is not available for dense models; use 'block'")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0, lr > 0, batch_size >= 1 (got {self.epochs}, {self.lr}, "
                             f"{self.batch_size})")
        if self.start_block_idx < 0 or (self.end_block_idx is not None and self.end_block_idx <= self.start_block_idx):
            raise ValueError(f"empty block range [{self.start_block_idx}, {self.end_block_idx})")
        get_scheme(self.scheme, self.act, self.kv_format, self.group_size)  # validate early


class _Batches:
    """Row batches of one boundary, from a dump file or an in-flight store."""

    def __init__(self, source: HiddenDump | HiddenStore, device: torch.device, dtype: torch.dtype, label: str):
        self.source, self.device, self.dtype, self.label = source, device, dtype, label

    def get(self, rows: torch.Tensor | range) -> torch.Tensor:
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):
            x = self.source.read(lo, hi)
        else:
            x = torch.cat([self.get(range(int(r), int(r) + 1)) for r in rows])
        if not torch.isfinite(x).all():
            raise DumpError(f"{self.label} holds NaN/inf activations in rows {lo}..{hi - 1}; "
                            "the FP model overflowed: re-extract with --dtype float32")
        return x.to(self.device, self.dtype)


def _mean_loss(block: nn.Module, xs: _Batches, ys: _Batches, n: int, bs: int, cos, sin) -> float:
    total = 0.0
    with torch.no_grad():
        for lo in range(0, n, bs):
            rows = range(lo, min(n, lo + bs))
            total += float(F.mse_loss(block(xs.get(rows), cos, sin).float(), ys.get(rows).float())) * len(rows)
    return total / n


def train_block(block: nn.Module, xs: _Batches, ys: _Batches, n: int, cfg: TrainConfig, cos, sin,
                label: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Calibrate, then learn the clipping of one quantized block; keep the best.

    Returns:
        ``(state, record)``: the quantizer tensors to save and the block's record.
    """
    bs = cfg.batch_size
    set_quant_state(block, QuantState.CALIBRATE)
    with torch.no_grad():
        for lo in range(0, n, bs):
            block(xs.get(range(lo, min(n, lo + bs))), cos, sin)
    rtn_state = quant_state_dict(block)
    freeze(block)
    loss_rtn = _mean_loss(block, xs, ys, n, bs, cos, sin)
    record = {"loss_rtn": loss_rtn, "epoch_losses": [], "fallback_to_rtn": False}
    params = learnable_parameters(block)
    if cfg.rtn or cfg.epochs == 0 or not params:
        record["loss_learned"] = loss_rtn
        return rtn_state, record

    set_quant_state(block, QuantState.FAKE_QUANT)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_loss, best_state = math.inf, rtn_state
    for epoch in tqdm(range(cfg.epochs), desc=f"{label}: train", leave=False, unit="epoch"):
        order, total = torch.randperm(n, generator=gen), 0.0
        for lo in range(0, n, bs):
            rows = order[lo:lo + bs].sort().values
            loss = F.mse_loss(block(xs.get(rows), cos, sin).float(), ys.get(rows).float())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: loss is {float(loss)} in epoch {epoch}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        record["epoch_losses"].append(total / n)
        if total / n < best_loss:
            best_loss, best_state = total / n, quant_state_dict(block)
    load_quant_state(block, best_state, label)
    freeze(block)
    record["loss_learned"] = _mean_loss(block, xs, ys, n, bs, cos, sin)
    if record["loss_learned"] > loss_rtn:  # learning made it worse on the calibration set: ship RTN
        record["fallback_to_rtn"] = True
        record["loss_learned"] = loss_rtn
        return rtn_state, record
    return best_state, record


def run_training(cfg: TrainConfig, ranks: Ranks = Ranks()) -> ParamDir:
    """Train (or RTN-calibrate) every block in the range; finished blocks are skipped.

    Under ``torchrun`` each rank trains every ``world``-th block of the range from
    the shared dump into the shared param dir.
    """
    if ranks.world > 1 and cfg.sequential:
        raise ValueError("--sequential chains the blocks and cannot be split over ranks; run it in one process")
    manifest = DumpManifest.load(cfg.data_dir)
    model = StreamingModel(cfg.model, device=ranks.device(cfg.device), dtype=torch.float32)
    fingerprint = model_fingerprint(model.reader)
    if manifest.model_fingerprint != fingerprint:
        raise DumpError(f"{cfg.data_dir} was dumped from another model (fingerprint {manifest.model_fingerprint}, "
                        f"{cfg.model} is {fingerprint}); dump this model with extract_calib_data.py")
    scheme = get_scheme(cfg.scheme, cfg.act, cfg.kv_format, cfg.group_size)
    params = ParamDir(cfg.output_dir)
    identity = {
        "model_fingerprint": fingerprint, "model_type": model.config.model_type, "num_blocks": model.num_blocks,
        "dump": asdict(manifest), "scheme": asdict(scheme), "lwc": cfg.lwc, "lac": cfg.lac,
        "ignore": list(cfg.ignore), "train_mode": cfg.train_mode, "rtn": cfg.rtn, "sequential": cfg.sequential,
    }
    params.bind(identity)  # atomic and idempotent: every rank checks for itself, all refuse alike
    end = model.num_blocks if cfg.end_block_idx is None else min(cfg.end_block_idx, model.num_blocks)
    blocks = ranks.share(range(cfg.start_block_idx, end))
    n, seq = manifest.n_samples, manifest.seq_len
    cos, sin = model.rotary(seq)
    store = None
    if cfg.sequential:
        store = HiddenStore.create((n, seq, model.hidden_size), torch.bfloat16)
        first = HiddenDump(boundary_path(cfg.data_dir, blocks[0]))
        for lo in range(0, n, cfg.batch_size):
            store.write(lo, first.read(lo, lo + cfg.batch_size))
    try:
        for idx in tqdm(blocks, desc=f"{scheme.name} blocks" + (f" rank {ranks.rank}" if ranks.world > 1 else ""),
                        unit="block"):
            label = f"block {idx + 1}/{model.num_blocks}"
            if params.is_done(idx) and not cfg.sequential:
                log.info("%s: done already, skipped", label)
                continue
            start = time.perf_counter()
            block = quantize_block(model.load_block(idx), scheme, cfg.ignore, cfg.lwc, cfg.lac)
            source = store if cfg.sequential else HiddenDump(boundary_path(cfg.data_dir, idx))
            xs = _Batches(source, model.device, model.dtype, str(boundary_path(cfg.data_dir, idx)))
            ys = _Batches(HiddenDump(boundary_path(cfg.data_dir, idx + 1)), model.device, model.dtype,
                          str(boundary_path(cfg.data_dir, idx + 1)))
            if params.is_done(idx):  # sequential rerun: reuse the finished block to move the inputs on
                load_quant_state(block, params.load_block(idx), str(params.params_path(idx)))
                freeze(block)
            else:
                state, record = train_block(block, xs, ys, n, cfg, cos, sin, label)
                record.update(block=idx, scheme=scheme.name, act=scheme.act_mode, kv_format=scheme.kv_format,
                              group_size=scheme.group_size, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                              n_samples=n, seq_len=seq, sequential=cfg.sequential, rtn=cfg.rtn,
                              seconds=round(time.perf_counter() - start, 3))
                params.save_block(idx, state, record)
                log.info("%s: mse rtn %.4g -> learned %.4g%s (%.1f s)", label, record["loss_rtn"],
                         record["loss_learned"], " (kept RTN)" if record["fallback_to_rtn"] else "",
                         record["seconds"])
            if store is not None:
                with torch.no_grad():
                    for lo in range(0, n, cfg.batch_size):
                        store.write(lo, block(xs.get(range(lo, min(n, lo + cfg.batch_size))), cos, sin))
            del block
    finally:
        if store is not None:
            store.close()
    ranks.barrier()
    return params


def summarize(params: ParamDir) -> str:
    """One line: how many blocks, mean RTN and learned block loss, how many improved."""
    records = params.records()
    if not records:
        return f"{params.path}: no finished blocks"
    mean_rtn = sum(r["loss_rtn"] for r in records) / len(records)
    if all(r["rtn"] for r in records):
        return f"{len(records)} blocks of round-to-nearest params in {params.path}: mean block mse {mean_rtn:.4g}"
    better = sum(r["loss_learned"] < r["loss_rtn"] for r in records)
    fallbacks = sum(r["fallback_to_rtn"] for r in records)
    mean_learned = sum(r["loss_learned"] for r in records) / len(records)
    return (f"{len(records)} blocks in {params.path}: mean block mse rtn {mean_rtn:.4g} -> learned {mean_learned:.4g}; "
            f"learned < rtn in {better}/{len(records)} blocks ({fallbacks} kept RTN)")
