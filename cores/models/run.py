"""Run a :class:`~cores.models.streaming.StreamingModel` over hidden states, one block at a time.

:func:`embed` writes token embeddings into a :class:`~cores.models.hidden_store.HiddenStore`,
:func:`run_blocks` replaces them by each block's output in turn (a block is read, run over every
sequence and freed before the next one is read), :func:`lm_head_nll` scores the last states, and
:func:`sequence_nll` chains the three. Peak memory is one block plus the batch in flight, whatever
the depth of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hidden_store import HiddenStore
from .streaming import StreamingModel

BlockTransform = Callable[[int, nn.Module], nn.Module]
"""``(idx, block) -> block``, applied to each block after it is read (e.g. to fake-quantize it)."""


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Sum of token negative log-likelihoods without materialising all logits.

    Args:
        hidden: ``[T, H]`` final-norm outputs.
        targets: ``[T]`` next-token ids.
        weight: ``[V, H]`` output embedding.
        chunk: vocabulary rows per matmul.

    Returns:
        fp64 scalar: ``sum_t logsumexp(logits_t) - logits_t[target_t]``.
    """
    lse = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
    target_logit = torch.zeros(hidden.shape[0], device=hidden.device)
    for lo in range(0, weight.shape[0], chunk):
        logits = (hidden @ weight[lo:lo + chunk].T).float()
        lse = torch.logaddexp(lse, logits.logsumexp(-1))
        inside = (targets >= lo) & (targets < lo + chunk)
        rows = inside.nonzero(as_tuple=True)[0]
        target_logit[rows] = logits[rows, targets[rows] - lo]
    return (lse - target_logit).double().sum()


@torch.no_grad()
def embed(model: StreamingModel, input_ids: torch.Tensor, store: HiddenStore, batch_size: int) -> None:
    """Write the token embeddings of ``input_ids`` ``[n, seq]`` into ``store``."""
    weight = model.embed_weight()
    for lo in range(0, len(input_ids), batch_size):
        store.write(lo, F.embedding(input_ids[lo:lo + batch_size].to(model.device), weight))


@torch.no_grad()
def run_blocks(
    model: StreamingModel,
    store: HiddenStore,
    batch_size: int,
    blocks: range | None = None,
    block_transform: BlockTransform | None = None,
    on_block_input: Callable[[int, HiddenStore], None] | None = None,
) -> None:
    """Push the states in ``store`` through ``blocks`` of ``model`` in place, one block at a time.

    Args:
        model: the checkpoint.
        store: hidden states, replaced by each block's output.
        batch_size: sequences per forward.
        blocks: block indices to run (default: all).
        block_transform: applied to each block after loading (e.g. to fake-quantize it).
        on_block_input: called with ``(idx, store)`` before block ``idx`` runs.
    """
    blocks = range(model.num_blocks) if blocks is None else blocks
    cos, sin = model.rotary(store.shape[1])
    for idx in tqdm(blocks, desc="blocks", unit="block"):
        if on_block_input is not None:
            on_block_input(idx, store)
        block = model.load_block(idx)
        if block_transform is not None:
            block = block_transform(idx, block)
        label = f"block {idx + 1}/{model.num_blocks}: forward"
        for lo in tqdm(range(0, len(store), batch_size), desc=label, leave=False, unit="batch"):
            hidden = store.read(lo, lo + batch_size).to(model.device, model.dtype)
            store.write(lo, block(hidden, cos, sin))
        del block


@torch.no_grad()
def lm_head_nll(model: StreamingModel, store: HiddenStore, input_ids: torch.Tensor, batch_size: int
                ) -> tuple[float, int]:
    """Final norm + ``lm_head`` over the last states: summed next-token NLL of all sequences and its token count."""
    norm, weight = model.final_norm(), model.lm_head_weight()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for lo in tqdm(range(0, len(store), batch_size), desc="lm_head", leave=False, unit="batch"):
        hidden = norm(store.read(lo, lo + batch_size).to(model.device, model.dtype))[:, :-1]
        targets = input_ids[lo:lo + batch_size, 1:].to(model.device)
        total += chunked_nll(hidden.reshape(-1, model.hidden_size), targets.reshape(-1), weight).cpu()
        count += targets.numel()
    return float(total), count


def sequence_nll(
    model: StreamingModel,
    input_ids: torch.Tensor,
    batch_size: int = 1,
    offload_dir: str | Path | None = None,
    block_transform: BlockTransform | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL of ``input_ids`` ``[n, seq]`` through the whole model, and its token count."""
    shape = (input_ids.shape[0], input_ids.shape[1], model.hidden_size)
    with HiddenStore.create(shape, model.dtype, offload_dir) as store:
        embed(model, input_ids, store, batch_size)
        run_blocks(model, store, batch_size, block_transform=block_transform)
        return lm_head_nll(model, store, input_ids, batch_size)
