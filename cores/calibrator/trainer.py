"""Block-wise learned quantization: each block trains on its own from the dump.

Block ``i`` learns its clipping parameters so that its quantized output on the
dumped FP input of block ``i`` matches the dumped FP input of block ``i + 1``.
Blocks are independent jobs (any range, any order, any machine); with
``sequential`` the inputs are instead the outputs of the already-quantized
blocks before, which is slower but compensates accumulated error. The train
modes ``mla`` and ``moe`` (:mod:`.sub_blocks`) learn the attention and the MLP
halves of each block as separate jobs into the same param dir.

A run, in parts: :func:`open_run` opens the model, checks the dump and binds the
param dir (:class:`TrainRun`); :func:`plan_blocks` picks this rank's blocks;
:func:`train_whole_block` or :func:`train_sub_block` trains one block and saves it
(:func:`save_block`); :class:`SequentialInputs` carries the quantized outputs from one
block to the next; :func:`run_training` chains them and :func:`summarize` reports.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models.hidden_store import HiddenStore
from ..models.streaming import StreamingModel
from ..quantization import QuantScheme, TargetSchemes, cast_for_compute, scheme_identity, serving_notes
from ..quantization.block import freeze, load_quant_state, quantize_block
from ..utils.checkpoint import model_fingerprint, norm_dtype
from ..utils.distributed import Ranks
from ..utils.io import remove_stale_temps
from .dump import DumpError, DumpFiles, DumpManifest, boundary_path
from .fit import Batches, fit, mse, norm_mse
from .params import ParamDir
from .sub_blocks import SubBlockJob, train_attention, train_mlp
from .train_config import TrainConfig  # also imported from here by the callers of run_training

log = logging.getLogger(__name__)

DEFAULT_DTYPE = "float32"
"""The compute dtype param dirs were trained in before ``--dtype``; a record names the dtype only when it is
another."""


@dataclass(frozen=True)
class TrainRun:
    """An opened run: the model in the compute dtype, its checked dump, the bound param dir, and what every
    block shares (scheme, rotary tables)."""

    cfg: TrainConfig
    model: StreamingModel
    manifest: DumpManifest
    dump: DumpFiles
    params: ParamDir
    scheme: QuantScheme
    targets: TargetSchemes | None
    cos: Tensor
    sin: Tensor

    @property
    def n(self) -> int:
        """Calibration samples."""
        return self.manifest.n_samples

    @property
    def seq(self) -> int:
        """Tokens per sample."""
        return self.manifest.seq_len

    def inputs(self, idx: int, source: HiddenStore | None = None) -> Batches:
        """The input batches of block ``idx``: its dumped boundary, or ``source`` (a sequential store)."""
        source = self.dump.boundary(idx) if source is None else source
        return Batches(source, self.model.device, self.model.dtype, str(boundary_path(self.cfg.data_dir, idx)))


def open_run(cfg: TrainConfig, ranks: Ranks = Ranks()) -> TrainRun:
    """Open the model in ``cfg``'s compute dtype, check that the dump was made from it, log the scheme's
    serving notes, and bind the param dir to this run (removing what dead runs left there).

    Raises:
        DumpError: for a dump of another model.
        ParamDirError: for a param dir of another run (finished blocks of another compute dtype are kept,
            with a warning: :func:`note_other_dtypes`).
    """
    manifest = DumpManifest.load(cfg.data_dir)
    dump = DumpFiles(cfg.data_dir)
    model = StreamingModel(cfg.model, device=ranks.device(cfg.device), dtype=cfg.compute_dtype)
    fingerprint = model_fingerprint(model.reader)
    if manifest.model_fingerprint != fingerprint:
        raise DumpError(f"{cfg.data_dir} was dumped from another model (fingerprint {manifest.model_fingerprint}, "
                        f"{cfg.model} is {fingerprint}); dump this model with extract_calib_data.py")
    scheme, targets = cfg.quant_scheme, cfg.target_schemes
    _log_serving_notes(cfg, model, scheme, targets)
    params = ParamDir(cfg.output_dir)
    params.bind(run_identity(cfg, model, manifest, fingerprint))  # atomic and idempotent: every rank checks
    for stale in remove_stale_temps(params.path):  # only those of dead processes: concurrent jobs keep theirs
        log.info("removed %s, left by an interrupted run", stale.name)
    note_other_dtypes(params, cfg)
    cos, sin = model.rotary(manifest.seq_len)
    return TrainRun(cfg, model, manifest, dump, params, scheme, targets, cos, sin)


def _log_serving_notes(cfg: TrainConfig, model: StreamingModel, scheme: QuantScheme,
                       targets: TargetSchemes | None) -> None:
    """Warn about what vLLM cannot serve of the scheme (and of each override's) on this model."""
    mode = cfg.train_mode
    routed = getattr(model.config, "n_routed_experts", None) or getattr(model.config, "num_experts", None)
    mla = getattr(model.config, "kv_lora_rank", None) is not None
    for note in serving_notes(scheme, moe=bool(routed) and mode != "mla", mla=mla and mode != "moe"):
        log.warning("%s: %s", cfg.model, note)
    for other in (targets.schemes()[1:] if targets else ()):
        for note in serving_notes(other, moe=bool(routed) and mode != "mla", mla=False):
            log.warning("%s: override %s: %s", cfg.model, other.name, note)


def run_identity(cfg: TrainConfig, model: StreamingModel, manifest: DumpManifest, fingerprint: str) -> dict:
    """What the params of this run are made from (:meth:`~.params.ParamDir.bind`): a later job into the same
    dir must agree on all of it."""
    identity = {
        "model_fingerprint": fingerprint, "model_type": model.config.model_type, "num_blocks": model.num_blocks,
        "dump": asdict(manifest), "scheme": scheme_identity(cfg.quant_scheme), "lwc": cfg.lwc, "lac": cfg.lac,
        "rounding": cfg.learn_rounding, "smooth": cfg.learn_smooth,
        "smooth_dtype": str(norm_dtype(model.reader)).removeprefix("torch.") if cfg.learn_smooth else None,
        "ignore": list(cfg.ignore), "train_mode": cfg.train_mode, "rtn": cfg.rtn, "sequential": cfg.sequential,
    }
    if cfg.overrides:  # absent otherwise: param dirs of runs without overrides keep their identity
        identity["overrides"] = [o.to_dict() for o in cfg.overrides]
    return identity


def note_other_dtypes(params: ParamDir, cfg: TrainConfig) -> None:
    """Warn when finished blocks of this mode were trained in another compute dtype; they are kept.

    The compute dtype changes the learned values, not which tensors there are (like the epochs or the
    rates, it is in each block's record, not in the identity), so blocks of either dtype combine.
    """
    other = {}
    for record in params.records(cfg.train_mode):
        dtype = record.get("dtype", DEFAULT_DTYPE)
        if dtype != cfg.dtype:
            other.setdefault(dtype, []).append(record["block"])
    for dtype, blocks in other.items():
        log.warning("%s: %s block(s) %s were trained with --dtype %s and are kept; this run trains in %s",
                    params.path, cfg.train_mode, blocks, dtype, cfg.dtype)


def plan_blocks(cfg: TrainConfig, num_blocks: int, ranks: Ranks = Ranks()) -> list[int]:
    """This rank's blocks of ``cfg``'s range (every ``world``-th one), clipped to the model's depth."""
    end = num_blocks if cfg.end_block_idx is None else min(cfg.end_block_idx, num_blocks)
    return ranks.share(range(cfg.start_block_idx, end))


def load_quantized_block(run: TrainRun, idx: int) -> nn.Module:
    """Block ``idx`` with its quantizers in, in ``FLOAT`` state: quantized weights in the checkpoint's dtype
    (bf16: half the memory, read in fp32 by every forward), everything else in the compute dtype."""
    cfg, model = run.cfg, run.model
    block = quantize_block(model.load_block(idx, stored_dtype=True), run.scheme, cfg.ignore, cfg.lwc, cfg.lac,
                           rounding=cfg.learn_rounding, smooth=cfg.learn_smooth,
                           smooth_dtype=norm_dtype(model.reader), targets=run.targets,
                           prefix=model.family.block_prefix(idx))
    return cast_for_compute(block, model.dtype, model.family.fp32_suffixes)


def train_block(block, xs: Batches, ys: Batches, n: int, cfg: TrainConfig, cos, sin, label: str,
                norm: torch.nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``--train_mode block``: learn a whole quantized block against the next dumped boundary.

    Args:
        norm: the norm that reads the block's output (``--loss norm_mse``); None: plain MSE.

    Returns:
        ``(state, record)`` as :func:`~.fit.fit`; the block is left frozen with that state.
    """
    def batch_loss(rows):
        out, target = block(xs.get(rows), cos, sin), ys.get(rows)
        return mse(out, target) if norm is None else norm_mse(out, target, norm)

    return fit(block, batch_loss, n, cfg.fit_options, label)


def train_whole_block(run: TrainRun, idx: int, xs: Batches, label: str, start: float) -> nn.Module:
    """``--train_mode block`` for block ``idx`` on inputs ``xs``: train it against the next dumped boundary and
    save it, or, when it is done already (a sequential rerun), load its params.

    Returns:
        The block, frozen with its params (what a sequential run feeds forward).
    """
    block = load_quantized_block(run, idx)
    if run.params.is_done(idx):  # sequential rerun: reuse the finished block to move the inputs on
        load_quant_state(block, run.params.load_block(idx), str(run.params.params_path(idx)))
        freeze(block)
        return block
    ys = run.inputs(idx + 1)
    norm = run.model.reading_norm(idx) if run.cfg.loss == "norm_mse" else None
    state, record = train_block(block, xs, ys, run.n, run.cfg, run.cos, run.sin, label, norm)
    save_block(run, idx, state, record, start)
    return block


def train_sub_block(run: TrainRun, idx: int, xs: Batches, label: str, start: float) -> None:
    """``--train_mode mla`` or ``moe`` for block ``idx`` on inputs ``xs`` (:mod:`.sub_blocks`), saved."""
    cfg, model = run.cfg, run.model
    job = SubBlockJob(model, run.scheme, tuple(cfg.ignore), cfg.lwc, cfg.lac, cfg.fit_options, xs, run.n, run.cos,
                      run.sin, cfg.min_expert_tokens, cfg.learn_rounding, cfg.loss, run.targets,
                      model.family.block_prefix(idx))
    state, record = (train_attention if cfg.train_mode == "mla" else train_mlp)(idx, job, label)
    save_block(run, idx, state, record, start)


class SequentialInputs:
    """``--sequential``: the inputs of the next block are the outputs of the quantized blocks before it.

    Held in a bf16 :class:`~cores.models.hidden_store.HiddenStore`, starting as the dumped input of the
    range's first block; :meth:`advance` runs a block over them in place. Close it (or use it as a context
    manager) to free a file-backed store.
    """

    def __init__(self, run: TrainRun, first: int):
        self.run, self.batch = run, run.cfg.batch_size
        self.store = HiddenStore.create((run.n, run.seq, run.model.hidden_size), torch.bfloat16)
        dumped = run.dump.boundary(first)
        for lo in range(0, run.n, self.batch):
            self.store.write(lo, dumped.read(lo, lo + self.batch))

    def batches(self, idx: int) -> Batches:
        """The current states as block ``idx``'s input batches."""
        return self.run.inputs(idx, self.store)

    @torch.no_grad()
    def advance(self, block: nn.Module, xs: Batches) -> None:
        """Replace the states by ``block``'s outputs on them (``xs``: :meth:`batches` of the block)."""
        n = self.run.n
        for lo in range(0, n, self.batch):
            self.store.write(lo, block(xs.get(range(lo, min(n, lo + self.batch))), self.run.cos, self.run.sin))

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> SequentialInputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_training(cfg: TrainConfig, ranks: Ranks = Ranks()) -> ParamDir:
    """Train (or RTN-calibrate) every block in the range; finished blocks are skipped.

    Under ``torchrun`` each rank trains every ``world``-th block of the range from
    the shared dump into the shared param dir.
    """
    if ranks.world > 1 and cfg.sequential:
        raise ValueError("--sequential chains the blocks and cannot be split over ranks; run it in one process")
    run = open_run(cfg, ranks)
    blocks = plan_blocks(cfg, run.model.num_blocks, ranks)
    mode = cfg.train_mode
    what = run.scheme.name if mode == "block" else f"{mode} {run.scheme.name}"
    bar = f"{what} blocks" + (f" rank {ranks.rank}" if ranks.world > 1 else "")
    with SequentialInputs(run, blocks[0]) if cfg.sequential and blocks else nullcontext() as sequential:
        for idx in tqdm(blocks, desc=bar, unit="block"):
            label = f"block {idx + 1}/{run.model.num_blocks}"
            if run.params.is_done(idx, mode) and sequential is None:
                log.info("%s: %s done already, skipped", label, mode)
                continue
            start = time.perf_counter()
            xs = run.inputs(idx) if sequential is None else sequential.batches(idx)
            if mode != "block":
                train_sub_block(run, idx, xs, label, start)
                continue
            block = train_whole_block(run, idx, xs, label, start)
            if sequential is not None:
                sequential.advance(block, xs)
            del block  # freed before the next block is read
    ranks.barrier()
    return run.params


def block_record(run: TrainRun, idx: int, record: dict, start: float) -> dict:
    """``record`` (from :func:`~.fit.fit` or a sub-block mode) with the run's settings and the block's time."""
    cfg, scheme, opts = run.cfg, run.scheme, run.cfg.fit_options
    record.update(block=idx, train_mode=cfg.train_mode, scheme=scheme.name, act=scheme.act_mode,
                  act_format=scheme.act_format, kv_format=scheme.kv_format, group_size=scheme.group_size,
                  epochs=cfg.epochs, lr=opts.lr, lwc_lr=opts.lwc_lr, rounding=cfg.learn_rounding,
                  round_lr=record.get("round_lr", opts.round_lr), round_optimizer=cfg.rounding_update, loss=cfg.loss,
                  smooth=cfg.learn_smooth, smooth_lr=opts.smooth_lr, batch_size=cfg.batch_size, n_samples=run.n,
                  seq_len=run.seq, sequential=cfg.sequential, rtn=cfg.rtn)
    if cfg.dtype != DEFAULT_DTYPE:  # absent in float32, as in the records written before --dtype
        record["dtype"] = cfg.dtype
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def save_block(run: TrainRun, idx: int, state: dict, record: dict, start: float) -> None:
    """Write block ``idx``'s params and record (:func:`block_record`) into the param dir, and log its losses."""
    cfg = run.cfg
    record = block_record(run, idx, record, start)
    run.params.save_block(idx, state, record, cfg.train_mode)
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
