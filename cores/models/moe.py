"""Mixture of experts with pluggable routers; experts are separate SwiGLU MLPs named as on disk.

A router maps tokens ``[T, hidden]`` to ``(topk_weights [T, k], topk_ids [T, k])``.
:class:`MoE` runs only the experts that received tokens, each on the rows routed to
it (index-select in, index-add out), so memory does not grow with the expert count.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SwiGLUMLP


class GroupLimitedSigmoidRouter(nn.Module):
    """DeepSeek-V3 router: sigmoid scores, bias-corrected group-limited top-k.

    ``e_score_correction_bias`` only steers which experts are chosen; the weights are
    the chosen experts' uncorrected scores, optionally normalised to sum to one, times
    ``routed_scaling_factor``. Experts are split into ``n_group`` groups ranked by the
    sum of their two best corrected scores; only the ``topk_group`` best groups compete.
    Scores are computed in fp32.

    Args:
        hidden_size: token width.
        num_experts: routed experts.
        top_k: experts per token.
        n_group: expert groups.
        topk_group: groups kept per token.
        norm_topk_prob: normalise the chosen weights.
        routed_scaling_factor: multiplier of the routed output.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        norm_topk_prob: bool,
        routed_scaling_factor: float,
    ):
        super().__init__()
        if num_experts % n_group or num_experts // n_group < 2:
            raise ValueError(f"{num_experts} experts do not split into {n_group} groups of at least 2")
        self.num_experts, self.top_k, self.n_group, self.topk_group = num_experts, top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, self.num_experts)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * self.routed_scaling_factor, topk_ids


class SoftmaxTopKRouter(nn.Module):
    """Qwen-MoE router: softmax over all experts (in fp32), top-k, optionally renormalised.

    Args:
        hidden_size: token width.
        num_experts: routed experts.
        top_k: experts per token.
        norm_topk_prob: normalise the chosen weights to sum to one.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        topk_weights, topk_ids = F.softmax(logits, dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights.to(logits.dtype), topk_ids


class MoE(nn.Module):
    """Routed SwiGLU experts (``experts.{e}``), a router (``gate``) and optional ``shared_experts``.

    Args:
        gate: router module, ``[T, hidden] -> (topk_weights, topk_ids)``.
        hidden_size: token width.
        intermediate_size: width of each routed expert.
        num_experts: routed experts.
        shared_experts: a module run on every token and added to the routed output.
    """

    def __init__(
        self,
        gate: nn.Module,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        shared_experts: nn.Module | None = None,
    ):
        super().__init__()
        self.gate = gate
        self.experts = nn.ModuleList(SwiGLUMLP(hidden_size, intermediate_size) for _ in range(num_experts))
        if shared_experts is not None:
            self.shared_experts = shared_experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for every token of ``x`` ``[..., hidden]``.

        Returns:
            ``(topk_weights, topk_ids)``, both ``[tokens, k]`` over the flattened leading dims.
        """
        return self.gate(x.reshape(-1, x.shape[-1]))

    @staticmethod
    def dispatch(topk_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(expert, token rows, top-k slots)`` for each expert that received tokens, in expert order.

        Args:
            topk_ids: ``[tokens, k]`` from :meth:`route`.
        """
        for expert in torch.unique(topk_ids).tolist():
            tokens, slots = torch.where(topk_ids == expert)
            yield expert, tokens, slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        topk_weights, topk_ids = self.route(flat)
        out = torch.zeros_like(flat)
        for expert, tokens, slots in self.dispatch(topk_ids):
            y = self.experts[expert](flat.index_select(0, tokens)) * topk_weights[tokens, slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        out = out.view_as(x)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


class RoutingCounter:
    """Counts the tokens each routed expert receives, per block, through forward hooks on the routers.

    :meth:`attach` has the ``(idx, block) -> block`` signature of a streaming block transform,
    so ``sequence_nll(model, ..., block_transform=counter.attach)`` (:mod:`cores.models.run`) counts a whole eval.

    Attributes:
        counts: block index -> ``[num_experts]`` int64 token counts (a token counts once per chosen expert).
    """

    def __init__(self):
        self.counts: dict[int, torch.Tensor] = {}

    def attach(self, idx: int, block: nn.Module) -> nn.Module:
        """Count the routing of ``block`` (index ``idx``) from now on; a block without a router is left alone."""
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, MoE):
            num_experts = len(mlp.experts)

            def count(_module, _args, out) -> None:
                ids = out[1].flatten().cpu()
                self.counts[idx] = self.counts.get(idx, 0) + torch.bincount(ids, minlength=num_experts)

            mlp.gate.register_forward_hook(count)
        return block
