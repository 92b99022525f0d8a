"""The seed's sub-block train modes: ``mla`` (attention) and ``moe`` (MLP, expert by expert).

Both read the dumped FP input ``x`` of block ``i`` and keep the other half of the
block in float:

- ``mla`` learns the attention's quantizers (and with a C8 scheme its KV-cache
  quantizer, on what the engine caches: for MLA the normalised latent and the
  rotary key) so that ``x + attn_q(norm(x))`` matches the float ``x + attn(norm(x))``.
- ``moe`` takes the float attention output ``h`` and the MLP input
  ``u = post_attention_layernorm(h)``, routes ``u`` with the float router (which
  is never quantized) and learns every MLP unit against its own float output:
  each routed expert on the tokens routed to it (loss weighted by the routing
  weight), the shared experts, or a dense block's MLP, on all tokens. Experts are
  read from the checkpoint, trained and freed one at a time, so memory does not
  grow with the expert count. An expert with fewer than ``min_expert_tokens``
  tokens keeps round-to-nearest weights, its static input scale observed on all
  tokens of the layer (any of them may be routed to it when serving).

Both return the block's quantizer state under block-relative names, so the
``mla`` and ``moe`` params of a block load into the fully quantized block as one.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..models.moe import MoE
from ..models.hidden_store import HiddenStore
from ..models.streaming import StreamingModel
from ..quantization import QuantScheme, TargetSchemes
from ..quantization.block import quant_state_dict, quantize_block
from .fit import Batches, FitOptions, calibrate, fit, mse, norm_mse


@dataclass(frozen=True)
class SubBlockJob:
    """What a sub-block mode needs besides the block: scheme, options, the dumped input."""

    model: StreamingModel
    scheme: QuantScheme
    ignore: tuple[str, ...]
    lwc: bool
    lac: bool
    opts: FitOptions
    inputs: Batches
    n: int
    cos: Tensor
    sin: Tensor
    min_expert_tokens: int = 32
    rounding: bool = False
    loss: str = "mse"
    targets: TargetSchemes | None = None
    prefix: str = ""

    def quantize(self, block: nn.Module, scope: str) -> None:
        """Quantize the ``scope`` part of ``block`` with this job's schemes."""
        quantize_block(block, self.scheme, self.ignore, self.lwc, self.lac, scope=scope, rounding=self.rounding,
                       targets=self.targets, prefix=self.prefix)


def _attention_out(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x + block.self_attn(block.input_layernorm(x), cos, sin)


def _store_outputs(job: SubBlockJob, source: Batches, fn) -> HiddenStore:
    """``fn`` of every sample batch of ``source``, without gradients, in a bf16 ``[n, seq, hidden]`` store."""
    bs = job.opts.batch
    store = HiddenStore.create((job.n, job.cos.shape[-2], job.model.hidden_size), torch.bfloat16)
    with torch.no_grad():
        for lo in range(0, job.n, bs):
            store.write(lo, fn(source.get(range(lo, min(job.n, lo + bs)))))
    return store


def train_attention(idx: int, job: SubBlockJob, label: str) -> tuple[dict[str, Tensor], dict]:
    """``--train_mode mla``: the attention sub-block of block ``idx`` (its MLP is never read)."""
    block = job.model.load_block(idx, skip=("mlp.",))
    with _store_outputs(job, job.inputs, lambda x: _attention_out(block, x, job.cos, job.sin)) as targets:
        job.quantize(block, "self_attn.")
        ys = Batches(targets, job.model.device, job.model.dtype, f"{label}: float attention output")

        def batch_loss(rows):
            out = _attention_out(block, job.inputs.get(rows), job.cos, job.sin)
            if job.loss == "norm_mse":  # as the MLP reads it
                return norm_mse(out, ys.get(rows), block.post_attention_layernorm)
            return mse(out, ys.get(rows))

        state, record = fit(block, batch_loss, job.n, job.opts, f"{label} attention")
    return state, record


@dataclass
class _Unit:
    """One MLP unit of a block: its name, the rows of the layer's tokens it sees, their weights."""

    name: str
    tokens: Tensor | None  # None: every token
    weights: Tensor | None  # None: all 1


def _gather(store: HiddenStore, tokens: Tensor, device, dtype, chunk: int = 8) -> Tensor:
    """Rows ``tokens`` (flat token indices) of ``store`` as ``[T, hidden]``."""
    n, seq, hidden = store.shape
    parts = []
    for lo in range(0, n, chunk):
        rows = store.read(lo, min(n, lo + chunk)).reshape(-1, hidden)
        inside = tokens[(tokens >= lo * seq) & (tokens < (lo + chunk) * seq)]
        parts.append(rows.index_select(0, inside - lo * seq))
    return torch.cat(parts).to(device, dtype)


def _route(block: nn.Module, u: HiddenStore, job: SubBlockJob) -> tuple[Tensor, Tensor]:
    """The float router's ``(topk_weights, topk_ids)`` of every token, ``[T, k]``."""
    weights, ids = [], []
    with torch.no_grad():
        for lo in range(0, job.n, job.opts.batch):
            w, i = block.mlp.route(u.read(lo, min(job.n, lo + job.opts.batch)).to(job.model.device, job.model.dtype))
            weights.append(w.float().cpu())
            ids.append(i.cpu())
    return torch.cat(weights), torch.cat(ids)


def _units(block: nn.Module, u: HiddenStore, job: SubBlockJob) -> tuple[list[_Unit], list[int]]:
    """The MLP units of ``block`` and, for an MoE block, the token count of every routed expert."""
    if not isinstance(block.mlp, MoE):
        return [_Unit("mlp", None, None)], []
    topk_weights, topk_ids = _route(block, u, job)
    units = [_Unit("mlp.shared_experts", None, None)] if hasattr(block.mlp, "shared_experts") else []
    counts = []
    for expert in range(len(block.mlp.experts)):
        tokens, slots = torch.where(topk_ids == expert)
        counts.append(len(tokens))
        units.append(_Unit(f"mlp.experts.{expert}", tokens, topk_weights[tokens, slots]))
    return units, counts


def _unit_loss(module: nn.Module, unit: _Unit, u: Batches, job: SubBlockJob, label: str, stack: ExitStack):
    """``(batch_loss, rows, batch)`` of one unit: sample rows against a stored float output for
    all-token units, gathered token rows (weighted by the routing weight) for a routed expert."""
    if unit.tokens is None:
        targets = stack.enter_context(_store_outputs(job, u, module))
        ys = Batches(targets, job.model.device, job.model.dtype, f"{label}: float output of {unit.name}")
        return (lambda rows: mse(module(u.get(rows)), ys.get(rows))), job.n, job.opts.batch
    x = _gather(u.source, unit.tokens, job.model.device, job.model.dtype)
    with torch.no_grad():
        y = module(x)
    weights = unit.weights.to(job.model.device)

    def batch_loss(rows):
        rows = torch.as_tensor(rows, device=x.device)
        return mse(module(x[rows]), y[rows], weights[rows])

    return batch_loss, len(x), job.opts.batch * job.cos.shape[-2]


def train_mlp(idx: int, job: SubBlockJob, label: str) -> tuple[dict[str, Tensor], dict]:
    """``--train_mode moe``: every MLP unit of block ``idx``, one at a time; the router stays float."""
    block = job.model.load_block(idx, skip=("mlp.experts.",))
    state: dict[str, Tensor] = {}
    units_record: dict[str, dict] = {}
    mlp_input = lambda x: block.post_attention_layernorm(_attention_out(block, x, job.cos, job.sin))  # noqa: E731
    with _store_outputs(job, job.inputs, mlp_input) as store:  # float attention
        u = Batches(store, job.model.device, job.model.dtype, f"{label}: MLP input")
        units, counts = _units(block, store, job)
        for unit in units:
            start = time.perf_counter()
            expert = unit.name.startswith("mlp.experts.")
            module = job.model.load_submodule(idx, block, unit.name) if expert else block.get_submodule(unit.name)
            tokens = job.n * job.cos.shape[-2] if unit.tokens is None else len(unit.tokens)
            with ExitStack() as stack:
                if unit.tokens is not None and tokens < max(1, job.min_expert_tokens):
                    # too few tokens to learn from: round-to-nearest, static range over every token of the layer
                    job.quantize(block, f"{unit.name}.")
                    calibrate(module, lambda rows: (module(u.get(rows)), 0.0), job.n, job.opts.batch)
                    units_record[unit.name] = {"tokens": tokens, "rtn_too_few_tokens": True}
                else:
                    batch_loss, n, batch = _unit_loss(module, unit, u, job, label, stack)
                    job.quantize(block, f"{unit.name}.")
                    _, record = fit(module, batch_loss, n, replace(job.opts, batch=batch), f"{label} {unit.name}")
                    units_record[unit.name] = {"tokens": tokens, "rtn_too_few_tokens": False, **record}
            units_record[unit.name]["seconds"] = round(time.perf_counter() - start, 3)
            state.update(quant_state_dict(module, prefix=f"{unit.name}."))
            if expert:
                module.to("meta")  # free the expert's weights before the next one is read
    learned = {k: v for k, v in units_record.items() if not v["rtn_too_few_tokens"]}
    total = sum(v["tokens"] for v in learned.values()) or 1
    record = {
        "loss_rtn": sum(v["loss_rtn"] * v["tokens"] for v in learned.values()) / total,
        "loss_learned": sum(v["loss_learned"] * v["tokens"] for v in learned.values()) / total,
        "fallback_to_rtn": bool(learned) and all(v["fallback_to_rtn"] for v in learned.values()),
        "units": units_record,
        "expert_tokens": counts,
        "rtn_experts": [int(k.rsplit(".", 1)[1]) for k, v in units_record.items() if v["rtn_too_few_tokens"]],
        "min_expert_tokens": job.min_expert_tokens,
    }
    return state, record
