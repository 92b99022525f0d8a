"""Learn the quantizer state of one module against float targets: the loop every train mode shares.

A train mode says what one *row* is (a calibration sample for a block or an
attention sub-block, a token for an expert) and how to compute the loss of a
batch of rows; :func:`fit` does the rest: calibrate static ranges, measure
round-to-nearest, learn the clipping with AdamW (learning rate decaying linearly to
0, weight and activation clips each with their own rate), measure the deployed (frozen)
forward after every epoch and keep the best state, round-to-nearest included.
"""

from __future__ import annotations

import math

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models.streaming import HiddenStore
from ..quantization import QuantState, set_quant_state
from .dump import DumpError, HiddenDump
from .quant_block import freeze, learnable_parameters, load_quant_state, quant_state_dict

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


def calibrate(module: nn.Module, batch_loss: BatchLoss, n: int, batch: int) -> None:
    """Run every row once with the static quantizers observing their ranges; the module ends frozen."""
    set_quant_state(module, QuantState.CALIBRATE)
    with torch.no_grad():
        for lo in range(0, n, batch):
            batch_loss(range(lo, min(n, lo + batch)))
    freeze(module)


def mean_loss(batch_loss: BatchLoss, n: int, batch: int) -> float:
    """Weighted mean loss over all ``n`` rows, without gradients."""
    total = weight = 0.0
    with torch.no_grad():
        for lo in range(0, n, batch):
            loss, w = batch_loss(range(lo, min(n, lo + batch)))
            total, weight = total + float(loss) * w, weight + w
    return total / max(weight, 1e-30)


def fit(module: nn.Module, batch_loss: BatchLoss, n: int, opts: FitOptions,
        label: str) -> tuple[dict[str, Tensor], dict]:
    """Calibrate, then learn the clipping of ``module``'s quantizers; keep the best.

    After every epoch the module is frozen (the deployed forward: weights quantized
    once, no straight-through) and its loss over all ``n`` rows is measured. The
    state with the lowest such loss wins, round-to-nearest (epoch 0) included, so a
    module never ships worse than RTN on its calibration data.

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
    rtn_state = quant_state_dict(module)
    loss_rtn = mean_loss(batch_loss, n, opts.batch)
    record = {"loss_rtn": loss_rtn, "loss_learned": loss_rtn, "epoch_losses": [], "epoch_eval_losses": [],
              "best_epoch": 0, "fallback_to_rtn": False}
    params = learnable_parameters(module)
    if opts.epochs == 0 or not params:
        return rtn_state, record

    lwc = {id(p) for name, p in module.named_parameters() if "weight_quantizer." in name}
    groups = [{"params": [p for p in params if id(p) in lwc], "lr": opts.lwc_lr or opts.lr},
              {"params": [p for p in params if id(p) not in lwc], "lr": opts.lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=opts.weight_decay)
    steps = opts.epochs * math.ceil(n / opts.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)  # linear decay to 0
    gen = torch.Generator().manual_seed(opts.seed)
    best_state = rtn_state
    for epoch in tqdm(range(1, opts.epochs + 1), desc=f"{label}: train", leave=False, unit="epoch"):
        set_quant_state(module, QuantState.FAKE_QUANT)
        order, total, weight = torch.randperm(n, generator=gen), 0.0, 0.0
        for lo in range(0, n, opts.batch):
            loss, w = batch_loss(order[lo:lo + opts.batch].sort().values)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{label}: loss is {float(loss)} in epoch {epoch}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, weight = total + float(loss.detach()) * w, weight + w
        record["epoch_losses"].append(total / max(weight, 1e-30))
        freeze(module)
        loss_eval = mean_loss(batch_loss, n, opts.batch)
        record["epoch_eval_losses"].append(loss_eval)
        if loss_eval < record["loss_learned"]:
            record.update(loss_learned=loss_eval, best_epoch=epoch)
            best_state = quant_state_dict(module)
    record["fallback_to_rtn"] = record["best_epoch"] == 0  # no epoch beat RTN on the calibration set: ship RTN
    load_quant_state(module, best_state, label)
    freeze(module)
    return best_state, record
