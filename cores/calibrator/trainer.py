"""Block-wise learned quantization: each block trains on its own from the dump.

Block ``i`` learns its clipping parameters so that its quantized output on the
dumped FP input of block ``i`` matches the dumped FP input of block ``i + 1``.
Blocks are independent jobs (any range, any order, any machine); with
``sequential`` the inputs are instead the outputs of the already-quantized
blocks before, which is slower but compensates accumulated error. The train
modes ``mla`` and ``moe`` (:mod:`.sub_blocks`) learn the attention and the MLP
halves of each block as separate jobs into the same param dir.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..models.streaming import HiddenStore, StreamingModel
from ..quantization import (DEFAULT_IGNORE, QuantScheme, SchemeOverride, TargetSchemes, get_scheme,
                            promote_unquantized, scheme_identity, serving_notes)
from ..quantization.block import freeze, load_quant_state, quantize_block
from ..utils.checkpoint import model_fingerprint, norm_dtype
from ..utils.distributed import Ranks
from ..utils.io import remove_stale_temps
from .dump import DumpError, DumpFiles, DumpManifest, boundary_path
from .fit import Batches, FitOptions, fit, mse, norm_mse
from .params import TRAIN_MODES, ParamDir
from .sub_blocks import SubBlockJob, train_attention, train_mlp

log = logging.getLogger(__name__)


DEFAULT_LWC_LR = {4: 1e-2, 8: 2e-3}
"""Weight-clip learning rate by weight bits (why: ``docs/defaults.md``)."""


DEFAULT_LAC_LR = {"static": 1e-2, "dynamic": 2e-3}
"""Activation / KV clip learning rate by activation mode (why: ``docs/defaults.md``)."""


DEFAULT_ROUND_LR = 5e-3
"""Adam learning rate of the rounding offsets (in [-0.5, 0.5]); signed steps default to SignRound's
``1 / steps`` instead (:class:`~.fit.FitOptions`)."""

DEFAULT_ROUND_OPTIMIZER = {4: "sign", 8: "adam"}
"""Rounding-offset update by weight bits: signed steps keep no optimizer state and learned better at W4;
W8 keeps the Adam its measured numbers were trained with (why: ``docs/defaults.md``)."""

DEFAULT_SMOOTH_LR = 5e-3
"""Adam learning rate of the log smoothing scales."""

SMOOTH_ALPHAS = (0.5, 0.7, 0.85)
"""SmoothQuant migration strengths the initial smoothing search tries besides identity."""

LOSSES = ("norm_mse", "mse")

ROUND_OPTIMIZERS = ("adam", "sign")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one ``main.py`` run.

    Attributes:
        model: FP model folder (bf16 or FP8).
        data_dir: calibration dump from ``extract_calib_data.py``.
        output_dir: param dir.
        scheme: ``w8a8c16``, ``w8a8c8``, ``w4a8c16`` or ``w4a8c8``.
        act: ``dynamic`` (per-token, the default: what vLLM's int8 kernels run, and far better than a
            per-tensor scale on models with massive activations) or ``static`` (per-tensor input scale,
            searched then learned clip; NPU engines).
        kv_format: ``int8`` or ``fp8`` for C8 schemes.
        act_format: ``int8`` activation codes, or ``fp8`` (dynamic, int4 weights).
        act_zero_point: static int8 activations with a zero point (asymmetric ``[min, max]`` ranges).
        group_size: W4 group size (default 128).
        lwc: learn weight clipping.
        lac: learn clipping of static activation / KV scales.
        rounding: learn a rounding offset per weight (SignRound-style), jointly with the clips.
        smooth: learned smoothing (equivalent transformations) between each norm and the linears
            reading it, ``v_proj`` -> ``o_proj`` and ``up_proj`` -> ``down_proj``, initialised by a
            SmoothQuant search over :data:`SMOOTH_ALPHAS` (identity included) and folded into the
            checkpoint at deploy; None: on in block mode, off in the sub-block modes (it needs the
            whole block).
        smooth_lr: learning rate of the log smoothing scales; None: :data:`DEFAULT_SMOOTH_LR`.
        loss: ``norm_mse``: the block output's MSE after the norm that reads it next (the next
            block's input norm, or the final norm); ``mse``: on the raw residual stream.
        epochs: passes over the calibration samples.
        lr: AdamW learning rate of the activation / KV clipping logits (LAC); None:
            1e-2 with static activations, 2e-3 with dynamic ones (:data:`DEFAULT_LAC_LR`).
        lwc_lr: learning rate of the weight clipping logits (LWC); None: 1e-2 for
            4-bit weights, 2e-3 for 8-bit (:data:`DEFAULT_LWC_LR`).
        round_lr: learning rate of the rounding offsets; None: ``1 / steps`` with signed steps,
            :data:`DEFAULT_ROUND_LR` with Adam.
        round_optimizer: ``adam`` (the offsets in AdamW) or ``sign`` (SignRound's signed gradient
            descent: no optimizer state, 8 bytes per weight less); None: by weight bits
            (:data:`DEFAULT_ROUND_OPTIMIZER`).
        weight_decay: AdamW weight decay.
        batch_size: samples per step.
        start_block_idx: first block to train.
        end_block_idx: one past the last block (None: to the end).
        train_mode: ``block`` (the whole block jointly), ``mla`` (the attention
            sub-block and its KV cache) or ``moe`` (the MLP sub-block, expert by expert).
        min_expert_tokens: routed experts with fewer calibration tokens keep RTN weights.
        rtn: write round-to-nearest params, no training.
        sequential: feed each block the output of the quantized blocks before it.
        device: ``cpu`` or ``cuda:N``.
        seed: shuffling seed.
        ignore: module patterns kept in high precision.
        overrides: per-target schemes on full module names (a recipe's ``overrides``), each deployed as a
            config group of its own; the KV cache stays the scheme's.
    """

    model: str
    data_dir: str
    output_dir: str
    scheme: str = "w8a8c8"
    act: str = "dynamic"
    kv_format: str = "fp8"
    act_format: str = "int8"
    act_zero_point: bool = False
    group_size: int | None = None
    lwc: bool = True
    lac: bool = True
    rounding: bool = True
    smooth: bool | None = None
    smooth_lr: float | None = None
    loss: str = "norm_mse"
    epochs: int = 5
    lr: float | None = None
    lwc_lr: float | None = None
    round_lr: float | None = None
    round_optimizer: str | None = None
    weight_decay: float = 0.0
    batch_size: int = 1
    start_block_idx: int = 0
    end_block_idx: int | None = None
    train_mode: str = "block"
    min_expert_tokens: int = 32
    rtn: bool = False
    sequential: bool = False
    device: str = "cpu"
    seed: int = 0
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    overrides: tuple[SchemeOverride, ...] = ()

    def __post_init__(self):
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode {self.train_mode!r}: choose one of {', '.join(TRAIN_MODES)}")
        if self.smooth and self.train_mode != "block":
            raise ValueError(f"--smooth folds scales across a whole block; with --train_mode {self.train_mode} "
                             "pass --no-smooth")
        if self.sequential and self.train_mode != "block":
            raise ValueError("--sequential feeds whole quantized blocks forward; it needs --train_mode block")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.round_optimizer is not None and self.round_optimizer not in ROUND_OPTIMIZERS:
            raise ValueError(f"round_optimizer {self.round_optimizer!r}: choose one of {', '.join(ROUND_OPTIMIZERS)}")
        rates = [r for r in (self.lr, self.lwc_lr, self.round_lr, self.smooth_lr) if r is not None]
        if self.epochs < 0 or any(r <= 0 for r in rates) or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0, lr > 0, lwc_lr > 0, batch_size >= 1 (got {self.epochs}, {self.lr}, "
                             f"{self.lwc_lr}, {self.batch_size})")
        if self.start_block_idx < 0 or (self.end_block_idx is not None and self.end_block_idx <= self.start_block_idx):
            raise ValueError(f"empty block range [--start_block_idx {self.start_block_idx}, "
                             f"--end_block_idx {self.end_block_idx})")
        self.target_schemes  # validate early

    @property
    def quant_scheme(self) -> QuantScheme:
        """The scheme these settings ask for (validated)."""
        return get_scheme(self.scheme, act_mode=self.act, kv_format=self.kv_format, group_size=self.group_size,
                          act_format=self.act_format, act_symmetric=not self.act_zero_point)

    @property
    def target_schemes(self) -> TargetSchemes | None:
        """The scheme with the overrides (None: no overrides, one scheme for every linear)."""
        return TargetSchemes(self.quant_scheme, tuple(self.overrides)) if self.overrides else None

    @property
    def fit_options(self) -> FitOptions:
        w_bits = self.quant_scheme.w_bits
        return FitOptions(0 if self.rtn else self.epochs, self.lr or DEFAULT_LAC_LR[self.act], self.weight_decay,
                          self.batch_size, self.seed, self.lwc_lr or DEFAULT_LWC_LR[w_bits],
                          self.round_lr or (None if self.rounding_update == "sign" else DEFAULT_ROUND_LR),
                          self.rounding_update, SMOOTH_ALPHAS if self.learn_smooth else (),
                          self.smooth_lr or DEFAULT_SMOOTH_LR, clip_search=self.lac and not self.rtn)

    @property
    def rounding_update(self) -> str:
        """``adam`` or ``sign``: the asked-for update of the rounding offsets, else the default for the bits."""
        return self.round_optimizer or DEFAULT_ROUND_OPTIMIZER[self.quant_scheme.w_bits]

    @property
    def learn_rounding(self) -> bool:
        """Rounding offsets are learned (and stored): asked for, and there is training."""
        return self.rounding and not self.rtn and self.epochs > 0

    @property
    def learn_smooth(self) -> bool:
        """Smoothing scales are searched (and learned when there are epochs): asked for, and not RTN."""
        return (self.train_mode == "block" if self.smooth is None else self.smooth) and not self.rtn


def train_block(block, xs: Batches, ys: Batches, n: int, cfg: TrainConfig, cos, sin, label: str,
                norm: torch.nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``--train_mode block``: learn a whole quantized block against the next dumped boundary.

    Args:
        norm: the norm that reads the block's output (``--loss norm_mse``); None: plain MSE.

    Returns:
        ``(state, record)`` as :func:`~.fit.fit`; the block is left frozen with that state.
    """
    if norm is None:
        return fit(block, lambda rows: mse(block(xs.get(rows), cos, sin), ys.get(rows)), n, cfg.fit_options, label)
    return fit(block, lambda rows: norm_mse(block(xs.get(rows), cos, sin), ys.get(rows), norm), n, cfg.fit_options,
               label)


def run_training(cfg: TrainConfig, ranks: Ranks = Ranks()) -> ParamDir:
    """Train (or RTN-calibrate) every block in the range; finished blocks are skipped.

    Under ``torchrun`` each rank trains every ``world``-th block of the range from
    the shared dump into the shared param dir.
    """
    if ranks.world > 1 and cfg.sequential:
        raise ValueError("--sequential chains the blocks and cannot be split over ranks; run it in one process")
    manifest = DumpManifest.load(cfg.data_dir)
    dump = DumpFiles(cfg.data_dir)
    model = StreamingModel(cfg.model, device=ranks.device(cfg.device), dtype=torch.float32)
    fingerprint = model_fingerprint(model.reader)
    if manifest.model_fingerprint != fingerprint:
        raise DumpError(f"{cfg.data_dir} was dumped from another model (fingerprint {manifest.model_fingerprint}, "
                        f"{cfg.model} is {fingerprint}); dump this model with extract_calib_data.py")
    scheme = cfg.quant_scheme
    mode = cfg.train_mode
    routed = getattr(model.config, "n_routed_experts", None) or getattr(model.config, "num_experts", None)
    mla = getattr(model.config, "kv_lora_rank", None) is not None
    for note in serving_notes(scheme, moe=bool(routed) and mode != "mla", mla=mla and mode != "moe"):
        log.warning("%s: %s", cfg.model, note)
    params = ParamDir(cfg.output_dir)
    identity = {
        "model_fingerprint": fingerprint, "model_type": model.config.model_type, "num_blocks": model.num_blocks,
        "dump": asdict(manifest), "scheme": scheme_identity(scheme), "lwc": cfg.lwc, "lac": cfg.lac,
        "rounding": cfg.learn_rounding, "smooth": cfg.learn_smooth,
        "smooth_dtype": str(norm_dtype(model.reader)).removeprefix("torch.") if cfg.learn_smooth else None,
        "ignore": list(cfg.ignore), "train_mode": mode, "rtn": cfg.rtn, "sequential": cfg.sequential,
    }
    if cfg.overrides:  # absent otherwise: param dirs of runs without overrides keep their identity
        identity["overrides"] = [o.to_dict() for o in cfg.overrides]
    targets = cfg.target_schemes
    for other in (targets.schemes()[1:] if targets else ()):
        for note in serving_notes(other, moe=bool(routed) and mode != "mla", mla=False):
            log.warning("%s: override %s: %s", cfg.model, other.name, note)
    params.bind(identity)  # atomic and idempotent: every rank checks for itself, all refuse alike
    for stale in remove_stale_temps(params.path):  # only those of dead processes: concurrent jobs keep theirs
        log.info("removed %s, left by an interrupted run", stale.name)
    end = model.num_blocks if cfg.end_block_idx is None else min(cfg.end_block_idx, model.num_blocks)
    blocks = ranks.share(range(cfg.start_block_idx, end))
    n, seq = manifest.n_samples, manifest.seq_len
    cos, sin = model.rotary(seq)
    store = None
    if cfg.sequential:
        store = HiddenStore.create((n, seq, model.hidden_size), torch.bfloat16)
        first = dump.boundary(blocks[0])
        for lo in range(0, n, cfg.batch_size):
            store.write(lo, first.read(lo, lo + cfg.batch_size))
    what = scheme.name if mode == "block" else f"{mode} {scheme.name}"
    try:
        for idx in tqdm(blocks, desc=f"{what} blocks" + (f" rank {ranks.rank}" if ranks.world > 1 else ""),
                        unit="block"):
            label = f"block {idx + 1}/{model.num_blocks}"
            if params.is_done(idx, mode) and not cfg.sequential:
                log.info("%s: %s done already, skipped", label, mode)
                continue
            start = time.perf_counter()
            source = store if cfg.sequential else dump.boundary(idx)
            xs = Batches(source, model.device, model.dtype, str(boundary_path(cfg.data_dir, idx)))
            if mode == "block":
                # quantized weights stay in the checkpoint's bf16, all else in fp32: a block's weights take
                # half the memory and every forward computes as with an fp32 copy
                block = quantize_block(model.load_block(idx, stored_dtype=True), scheme, cfg.ignore, cfg.lwc,
                                       cfg.lac, rounding=cfg.learn_rounding, smooth=cfg.learn_smooth,
                                       smooth_dtype=norm_dtype(model.reader), targets=targets,
                                       prefix=model.family.block_prefix(idx))
                promote_unquantized(block, model.dtype)
                if params.is_done(idx):  # sequential rerun: reuse the finished block to move the inputs on
                    load_quant_state(block, params.load_block(idx), str(params.params_path(idx)))
                    freeze(block)
                else:
                    ys = Batches(dump.boundary(idx + 1), model.device, model.dtype,
                                 str(boundary_path(cfg.data_dir, idx + 1)))
                    norm = model.reading_norm(idx) if cfg.loss == "norm_mse" else None
                    state, record = train_block(block, xs, ys, n, cfg, cos, sin, label, norm)
                    _save(params, idx, state, record, cfg, scheme, n, seq, start)
                if store is not None:
                    with torch.no_grad():
                        for lo in range(0, n, cfg.batch_size):
                            store.write(lo, block(xs.get(range(lo, min(n, lo + cfg.batch_size))), cos, sin))
                del block
            else:
                job = SubBlockJob(model, scheme, tuple(cfg.ignore), cfg.lwc, cfg.lac, cfg.fit_options, xs, n, cos, sin,
                                  cfg.min_expert_tokens, cfg.learn_rounding, cfg.loss, targets,
                                  model.family.block_prefix(idx))
                state, record = (train_attention if mode == "mla" else train_mlp)(idx, job, label)
                _save(params, idx, state, record, cfg, scheme, n, seq, start)
    finally:
        if store is not None:
            store.close()
    ranks.barrier()
    return params


def _save(params: ParamDir, idx: int, state: dict, record: dict, cfg: TrainConfig, scheme, n: int, seq: int,
          start: float) -> None:
    record.update(block=idx, train_mode=cfg.train_mode, scheme=scheme.name, act=scheme.act_mode, act_format=scheme.act_format,
                  kv_format=scheme.kv_format, group_size=scheme.group_size, epochs=cfg.epochs, lr=cfg.fit_options.lr,
                  lwc_lr=cfg.fit_options.lwc_lr, rounding=cfg.learn_rounding,
                  round_lr=record.get("round_lr", cfg.fit_options.round_lr),
                  round_optimizer=cfg.rounding_update, loss=cfg.loss, smooth=cfg.learn_smooth,
                  smooth_lr=cfg.fit_options.smooth_lr,
                  batch_size=cfg.batch_size, n_samples=n, seq_len=seq, sequential=cfg.sequential, rtn=cfg.rtn,
                  seconds=round(time.perf_counter() - start, 3))
    params.save_block(idx, state, record, cfg.train_mode)
    rtn_experts = record.get("rtn_experts")
    log.info("block %d %s: mse rtn %.4g -> learned %.4g%s%s (%.1f s)", idx, cfg.train_mode, record["loss_rtn"],
             record["loss_learned"], " (kept RTN)" if record["fallback_to_rtn"] else "",
             f"; {len(rtn_experts)} experts with < {cfg.min_expert_tokens} tokens kept RTN" if rtn_experts else "",
             record["seconds"])


def summarize(params: ParamDir) -> str:
    """A line per train mode: how many blocks, mean RTN and learned loss, how many improved."""
    lines = []
    for mode in params.mode_identities() or {"block": None}:
        records = params.records(mode)
        if not records:
            lines.append(f"{params.path}: no finished {mode} blocks")
            continue
        what = "blocks" if mode == "block" else f"{mode} sub-blocks"
        mean_rtn = sum(r["loss_rtn"] for r in records) / len(records)
        if all(r["rtn"] for r in records):
            lines.append(f"{len(records)} {what} of round-to-nearest params in {params.path}: "
                         f"mean mse {mean_rtn:.4g}")
            continue
        better = sum(r["loss_learned"] < r["loss_rtn"] for r in records)
        fallbacks = sum(r["fallback_to_rtn"] for r in records)
        mean_learned = sum(r["loss_learned"] for r in records) / len(records)
        line = (f"{len(records)} {what} in {params.path}: mean mse rtn {mean_rtn:.4g} -> learned {mean_learned:.4g}; "
                f"learned < rtn in {better}/{len(records)} ({fallbacks} kept RTN)")
        if mode == "moe":
            experts = sum(len(r["expert_tokens"]) for r in records)
            rtn_experts = sum(len(r["rtn_experts"]) for r in records)
            line += f"; {rtn_experts}/{experts} routed experts had too few tokens and kept RTN"
        lines.append(line)
    return "\n".join(lines)
