"""Learn the quantizer state of one module against float targets: the loop every train mode shares.

A train mode says what one *row* is (a calibration sample for a block or an
attention sub-block, a token for an expert) and how to compute the loss of a
batch of rows; :func:`fit` does the rest: calibrate static ranges, measure
round-to-nearest, choose initial smoothing scales where the module has smoothers,
learn clips and smoothing scales with AdamW and rounding offsets with signed steps (or
AdamW), every rate decaying linearly to 0, measure the deployed (frozen) forward after
every epoch and keep the best state, the starting one included.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models.hidden_store import HiddenStore
from ..quantization import LAC_INIT_LOGIT, ActQuantizer, QuantState, set_quant_state
from ..quantization.block import (freeze, init_smoothers, learnable_parameters, load_quant_state, quant_state_dict,
                                  smoothers)
from .dump import DumpError, HiddenDump

Rows = Sequence[int] | Tensor
BatchLoss = Callable[[Rows], tuple[Tensor, float]]
"""``rows -> (loss, weight)``: the batch's mean loss and its weight in the dataset mean."""


@dataclass(frozen=True)
class FitOptions:
    """How one module learns.

    Attributes:
        epochs: passes over the rows (0: round-to-nearest only).
        lr: AdamW learning rate of the activation and KV-cache clipping logits (LAC).
        lwc_lr: learning rate of the weight clipping logits (LWC); None: ``lr``.
        round_lr: learning rate of the rounding offsets; None: ``lwc_lr`` with ``adam``,
            ``1 / steps`` with ``sign`` (SignRound's rate: an offset can travel 0.5 in all).
        round_optimizer: ``adam``: the offsets learn in the AdamW groups; ``sign``: signed gradient
            descent (SignRound's update, ``offset -= lr * sign(grad)``, clamped to [-0.5, 0.5]) on the
            same linearly decaying rate, with no optimizer state.
        smooth_alphas: SmoothQuant migration strengths tried for the initial smoothing scales
            (identity is always a candidate); empty: smoothing stays identity and is not learned.
        smooth_lr: learning rate of the log smoothing scales; None: ``lr``.
        smooth_search_rows: rows the smoothing search calibrates and scores each candidate on.
        clip_search: after observing the static ranges, a second pass picks each static quantizer's
            initial clip from :data:`~cores.quantization.quantizers.CLIP_GRID` by its quantization MSE.
        weight_decay: AdamW weight decay.
        batch: rows per step.
        seed: shuffling seed.
    """

    epochs: int
    lr: float
    weight_decay: float
    batch: int
    seed: int = 0
    lwc_lr: float | None = None
    round_lr: float | None = None
    round_optimizer: str = "adam"
    smooth_alphas: tuple[float, ...] = ()
    smooth_lr: float | None = None
    smooth_search_rows: int = 2
    clip_search: bool = False


class Batches:
    """Row batches of one boundary, from a dump file or an in-flight store, checked for NaN."""

    def __init__(self, source: HiddenDump | HiddenStore, device: torch.device, dtype: torch.dtype, label: str):
        self.source, self.device, self.dtype, self.label = source, device, dtype, label

    def get(self, rows: Rows) -> Tensor:
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):
            x = self.source.read(lo, hi)
        else:
            x = torch.cat([self.get(range(int(r), int(r) + 1)) for r in rows])
        if not torch.isfinite(x).all():
            raise DumpError(f"{self.label} holds NaN/inf activations in rows {lo}..{hi - 1}; "
                            "the FP model overflowed: re-extract with --dtype float32")
        return x.to(self.device, self.dtype)


def mse(out: Tensor, target: Tensor, weight: Tensor | None = None) -> tuple[Tensor, float]:
    """Mean squared error over the last dim, averaged over rows (weighted by ``weight``), and the batch weight."""
    err = (out.float() - target.float()).pow(2).mean(dim=-1)
    if weight is None:
        return err.mean(), float(err.shape[0])
    total = weight.float().sum()
    return (err * weight.float()).sum() / total, float(total)


def norm_mse(out: Tensor, target: Tensor, norm: nn.Module) -> tuple[Tensor, float]:
    """:func:`mse` of the two after ``norm`` (the RMSNorm that reads them next), and the batch weight.

    On the residual stream a few massive-activation channels dominate a plain MSE
    while the next layer sees every token rescaled by its RMS; the error measured
    after that norm is the one the rest of the model reads.
    """
    return mse(norm(out.float()), norm(target.float()))


def calibrate(module: nn.Module, batch_loss: BatchLoss, n: int, batch: int, clip_search: bool = False) -> None:
    """Run every row once with the static quantizers observing their ranges; the module ends frozen.

    With ``clip_search`` a second pass scores the clips of every static int8 quantizer
    (:meth:`~cores.quantization.ActQuantizer.start_clip_search`) and each takes its best.
    """
    set_quant_state(module, QuantState.CALIBRATE)
    static = [m for m in module.modules() if isinstance(m, ActQuantizer) and m.absmax is not None]
    searched = [m for m in static if m.fmt == "int8"]  # an fp8 cache's error is relative: its absmax stays
    with torch.no_grad():
        for search in (False, True) if clip_search and searched else (False,):
            for quantizer in searched if search else ():
                quantizer.start_clip_search()
            for lo in range(0, n, batch):
                batch_loss(range(lo, min(n, lo + batch)))
            for quantizer in searched if search else ():
                quantizer.finish_clip_search()
    freeze(module)


def reset_ranges(module: nn.Module) -> None:
    """Forget the observed ranges (and searched clips) of every static quantizer, for a new calibration pass."""
    for child in module.modules():
        if isinstance(child, ActQuantizer) and child.absmax is not None:
            child.absmax.zero_()
            if child.clip_factor is not None:
                child.clip_factor.data.fill_(LAC_INIT_LOGIT)


def search_init(module: nn.Module, batch_loss: BatchLoss, n: int, opts: FitOptions, record: dict) -> None:
    """The starting point of training: smoothing scales and static clips, or plain RTN where that is better.

    Each smoothing candidate (identity, or SmoothQuant at each of ``opts.smooth_alphas``)
    recalibrates the static ranges and is scored frozen on the first
    ``opts.smooth_search_rows`` rows. The winner is recalibrated on all ``n`` rows, with the
    clip search when ``opts.clip_search``, and kept if it beats RTN there
    (``record["loss_rtn"]``); otherwise the module goes back to RTN. The module ends frozen.
    """
    rows = min(n, opts.smooth_search_rows)
    alphas = (None, *opts.smooth_alphas) if smoothers(module) else (None,)

    def start_from(alpha: float | None, search: bool, upto: int) -> None:
        init_smoothers(module, alpha)
        reset_ranges(module)
        calibrate(module, batch_loss, upto, opts.batch, search)

    scores: dict[str, float] = {}
    if len(alphas) > 1:
        for alpha in alphas:
            start_from(alpha, False, rows)
            scores[str(alpha)] = mean_loss(batch_loss, rows, opts.batch)
    best = min(scores, key=scores.get) if scores else "None"
    alpha = None if best == "None" else float(best)
    start_from(alpha, opts.clip_search, n)
    loss = mean_loss(batch_loss, n, opts.batch)
    if loss >= record["loss_rtn"]:
        alpha, loss = None, record["loss_rtn"]
        start_from(None, False, n)
    record.update(smooth_alpha=alpha, smooth_scores=scores, loss_init=loss, init_is_rtn=loss == record["loss_rtn"])


def mean_loss(batch_loss: BatchLoss, n: int, batch: int) -> float:
    """Weighted mean loss over all ``n`` rows, without gradients."""
    total = weight = 0.0
    with torch.no_grad():
        for lo in range(0, n, batch):
            loss, w = batch_loss(range(lo, min(n, lo + batch)))
            total, weight = total + float(loss) * w, weight + w
    return total / max(weight, 1e-30)


@torch.no_grad()
def sign_step(offsets: list[nn.Parameter], lr: float) -> None:
    """One signed-gradient step of the rounding offsets (SignRound), kept in [-0.5, 0.5], in place.

    An offset the batch did not reach (an idle expert's) has a zero grad and stays."""
    for p in offsets:
        if p.grad is not None:
            p.sub_(p.grad.sign_(), alpha=lr).clamp_(-0.5, 0.5)


class UpdateInBackward:
    """Each learned tensor takes its update inside the backward, as soon as its gradient is complete, and
    that gradient is freed at once: a block's gradients never exist together (4 bytes per weight less for
    the rounding offsets), with the values of a step after the whole backward.

    Exactly what the loop ``zero the gradients; backward; signed step; opt.step()`` computes, with gradients
    kept between steps (zeroed, not freed):

    - a tensor's update reads only its own gradient and state (AdamW without ``foreach``, signed steps),
      and every use of the tensor in the forward (checkpoint recomputations included) is behind it in the
      backward before its gradient is complete, so it can move at once;
    - a gradient that reaches a zeroed buffer is ``0 + g``: a tensor that had a gradient before gets ``g + 0``
      (the same bits: a ``-0`` becomes ``+0``, as there);
    - a tensor that had a gradient before and is not reached in a step (an idle expert's) took an AdamW step
      on its zeroed gradient: :meth:`finish_step` gives it that step (a signed step of 0 changes nothing).

    Args:
        params: the learned tensors.
        signed: those of them that take signed steps (:func:`sign_step`) at :attr:`sign_lr`.
        opt: the AdamW of the others (None: none); its ``step()`` updates exactly the tensors that hold a
            gradient, here the one in the hook.
    """

    def __init__(self, params: list[nn.Parameter], signed: list[nn.Parameter], opt: torch.optim.Optimizer | None):
        self.params, self.opt = params, opt
        self.signed = {id(p) for p in signed}
        self.sign_lr = 0.0
        self.seen: set[int] = set()  # had a gradient in an earlier step: the loop kept a zeroed buffer
        self.reached: set[int] = set()  # got a gradient in this step
        self.handles = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    @torch.no_grad()
    def _update(self, p: nn.Parameter) -> None:
        if id(p) in self.seen:
            p.grad.add_(0.0)
        if id(p) in self.signed:
            sign_step([p], self.sign_lr)
        else:
            self.opt.step()
        p.grad = None
        self.seen.add(id(p))
        self.reached.add(id(p))

    @torch.no_grad()
    def finish_step(self) -> None:
        """After the backward: the AdamW step of every tensor not reached this time on its zeroed gradient."""
        zeros: dict[tuple, Tensor] = {}  # the update only reads the gradient: one zero tensor per shape
        skip = self.reached | self.signed
        idle = [p for p in self.params if id(p) in self.seen and id(p) not in skip]
        for p in idle:
            p.grad = zeros.setdefault((p.shape, p.dtype, p.device), torch.zeros_like(p))
        if self.opt is not None:
            self.opt.step()
        for p in idle:
            p.grad = None
        self.reached.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def fit(module: nn.Module, batch_loss: BatchLoss, n: int, opts: FitOptions,
        label: str) -> tuple[dict[str, Tensor], dict]:
    """Calibrate, search the start (:func:`search_init`), then learn clips, rounding and smoothing; keep the best.

    After every epoch the module is frozen (the deployed forward: weights quantized
    once, no straight-through) and its loss over all ``n`` rows is measured. The
    state with the lowest such loss wins, the start (epoch 0: RTN, or the searched
    smoothing and clips where they beat it) included, so a module never ships worse
    than RTN on its calibration data.

    Args:
        module: the quantized module (in any state); ``batch_loss`` runs it.
        batch_loss: loss of a batch of row indices.
        n: rows.
        opts: epochs, learning rate, batch.
        label: names the module in progress bars and errors.

    Returns:
        ``(state, record)``: the quantizer tensors of ``module`` and its record;
        the module is left frozen with that state loaded.
    """
    calibrate(module, batch_loss, n, opts.batch)
    loss_rtn = mean_loss(batch_loss, n, opts.batch)
    record = {"loss_rtn": loss_rtn, "loss_learned": loss_rtn, "epoch_losses": [], "epoch_eval_losses": [],
              "best_epoch": 0, "fallback_to_rtn": False}
    has_static = any(isinstance(m, ActQuantizer) and m.absmax is not None and m.fmt == "int8" for m in module.modules())
    if (opts.smooth_alphas and smoothers(module)) or (opts.clip_search and has_static):
        search_init(module, batch_loss, n, opts, record)
        record["loss_learned"] = record["loss_init"]
    rtn_state = quant_state_dict(module)
    params = learnable_parameters(module)
    if opts.epochs == 0 or not params:
        return rtn_state, record
    rtn_state = _shared_zeros(rtn_state)

    named = dict(module.named_parameters())
    rounding = {id(p) for name, p in named.items() if name.endswith(".round_offset")}
    smooth = {id(p) for name, p in named.items() if name.endswith("smooth.log_scale")}
    lwc = {id(p) for name, p in named.items() if "weight_quantizer." in name} - rounding
    lwc_lr = opts.lwc_lr or opts.lr
    steps = opts.epochs * math.ceil(n / opts.batch)
    signed = [p for p in params if id(p) in rounding] if opts.round_optimizer == "sign" else []
    # signed steps: SignRound's 1 / steps, so that an offset can travel 0.5 under the linear decay
    round_lr = opts.round_lr or (1.0 / steps if signed else lwc_lr)
    record["round_lr"] = round_lr
    groups = [{"params": [p for p in params if id(p) in lwc], "lr": lwc_lr},
              {"params": [p for p in params if id(p) in rounding and not signed], "lr": round_lr},
              {"params": [p for p in params if id(p) in smooth], "lr": opts.smooth_lr or opts.lr},
              {"params": [p for p in params if id(p) not in lwc | rounding | smooth], "lr": opts.lr}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=opts.weight_decay, foreach=False) if groups else None
    # the loss relative to the start: block losses are 1e-5..1e-2, and their gradients would sit below
    # AdamW's eps (1e-8), which then damps every step; relative to the start, gradients are O(1)
    loss_scale = 1.0 / max(record["loss_learned"], 1e-30)
    decay = lambda step: 1.0 - step / steps  # noqa: E731  linear decay to 0, every kind of parameter
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay) if opt else None
    gen = torch.Generator().manual_seed(opts.seed)
    best_state, step = rtn_state, 0
    updates = UpdateInBackward(params, signed, opt)
    try:
        for epoch in tqdm(range(1, opts.epochs + 1), desc=f"{label}: train", leave=False, unit="epoch"):
            set_quant_state(module, QuantState.FAKE_QUANT)
            order, total, weight = torch.randperm(n, generator=gen), 0.0, 0.0
            for lo in range(0, n, opts.batch):
                loss, w = batch_loss(order[lo:lo + opts.batch].sort().values)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{label}: loss is {float(loss)} in epoch {epoch}; lower --lr")
                updates.sign_lr = round_lr * decay(step)
                (loss * loss_scale).backward()  # every learned tensor takes its update in here
                updates.finish_step()
                if opt:
                    sched.step()
                step += 1
                total, weight = total + float(loss.detach()) * w, weight + w
            record["epoch_losses"].append(total / max(weight, 1e-30))
            freeze(module)
            loss_eval = mean_loss(batch_loss, n, opts.batch)
            record["epoch_eval_losses"].append(loss_eval)
            if loss_eval < record["loss_learned"]:
                record.update(loss_learned=loss_eval, best_epoch=epoch)
                best_state = quant_state_dict(module)
    finally:
        updates.remove()
    # no epoch beat the start on the calibration set: ship the start (RTN unless the search found better)
    record["fallback_to_rtn"] = record["best_epoch"] == 0 and record.get("init_is_rtn", True)
    load_quant_state(module, best_state, label)
    freeze(module)
    return {name: tensor.contiguous() for name, tensor in best_state.items()}, record


def _shared_zeros(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every tensor whose bits are all 0 (the rounding offsets before any training) as a view of
    one zero that takes no memory: the start state is kept through training at no cost; ``contiguous()``
    gives the same bytes back."""
    return {name: torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
            if t.numel() > 1 and not _bits(t).any() else t for name, t in state.items()}


def _bits(tensor: Tensor) -> Tensor:
    """The raw bits of a tensor as integers of its width (so -0.0 is not 0)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.view(ints[tensor.element_size()]) if tensor.is_floating_point() else tensor
