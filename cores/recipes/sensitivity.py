"""Per-layer quantization sensitivity, for choosing which layers to keep in BF16.

For each decoder layer *i*, the model is run with only layer *i* quantized
(round-to-nearest weights, dynamic per-token activations) and compared with the
float model on a few calibration windows: the mean token KL divergence
``KL(p_float || p_i)`` of the next-token distributions, and the perplexity.

The streaming runtime does it with each block read once: the float hidden states
and one perturbed copy per layer already passed (``P_j`` = states with only layer
*j* quantized) move through the blocks together. At block *i* every ``P_j`` (j < i)
goes through the float block, ``P_i`` starts as the float input of block *i* and
goes through the quantized block, and the float states through the float block.
Memory: one block plus ``n_layers + 1`` hidden-state stores (RAM, or files under
``offload_dir``), compute: ``n (n + 1) / 2`` block forwards over the windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ..models.hidden_store import HiddenStore
from ..models.run import embed
from ..models.streaming import StreamingModel
from ..quantization import DEFAULT_IGNORE, get_scheme, scheme_name
from ..quantization.block import freeze, quantize_block
from ..utils.data import load_text, ppl_windows
from .schema import RECIPE_VERSION, Recipe, format_layer_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityConfig:
    """What to measure.

    Attributes:
        model: FP model folder (not a deployed checkpoint).
        dataset: Text for the windows (``.txt`` file, folder, ``wikitext2`` ...).
        split: Its split; calibration text (``train``) by default, so the test split stays unseen.
        seq_len: Window length in tokens.
        windows: Number of windows.
        scheme: The scheme measured; a C8 scheme is measured as its C16 twin (RTN has no KV scales).
        ignore: Block-relative module patterns kept in high precision.
        device: ``cpu`` or ``cuda:N``.
        dtype: Compute dtype (``auto``: fp32 on CPU).
        batch_size: Windows per forward.
        offload_dir: Keep the hidden-state stores in files here.
    """

    model: str
    dataset: str
    split: str = "train"
    seq_len: int = 512
    windows: int = 4
    scheme: str = "w8a8c16"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 1
    offload_dir: str | None = None

    def __post_init__(self):
        if self.seq_len < 2 or self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"need seq_len >= 2, windows >= 1, batch_size >= 1 (got {self.seq_len}, "
                             f"{self.windows}, {self.batch_size})")


@dataclass(frozen=True)
class LayerScore:
    """Sensitivity of one layer: the model with only that layer quantized, against the float model."""

    layer: int
    kl: float
    ppl: float


@dataclass
class SensitivityResult:
    """Scores of every layer and the float baseline on the same windows."""

    scores: list[LayerScore]
    float_ppl: float
    tokens: int
    scheme: str
    config: dict = field(default_factory=dict)

    def ranking(self) -> list[LayerScore]:
        """Layers, most sensitive (largest KL) first."""
        return sorted(self.scores, key=lambda s: (-s.kl, s.layer))

    def pick(self, budget: int) -> list[int]:
        """The ``budget`` most sensitive layers, sorted by index."""
        return sorted(s.layer for s in self.ranking()[:budget])

    def table(self) -> str:
        lines = [f"{'rank':>4} {'layer':>5} {'KL(float||q)':>13} {'ppl':>9}   (float ppl {self.float_ppl:.4f}, "
                 f"{self.tokens} tokens, {self.scheme} RTN, one layer at a time)"]
        lines += [f"{r:>4} {s.layer:>5} {s.kl:>13.6f} {s.ppl:>9.4f}" for r, s in enumerate(self.ranking(), 1)]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"float_ppl": self.float_ppl, "tokens": self.tokens, "scheme": self.scheme, "config": self.config,
                "scores": [asdict(s) for s in self.scores], "ranking": [s.layer for s in self.ranking()]}


def _measured_scheme(name: str):
    scheme = get_scheme(name, act_mode="dynamic")
    if scheme.kv_bits is not None:
        twin = scheme_name(scheme.w_bits, kv=False)
        log.info("%s: round-to-nearest has no KV-cache scales; measuring weights and activations as %s", name, twin)
        scheme = get_scheme(twin, act_mode="dynamic", group_size=scheme.group_size)
    return scheme


@torch.no_grad()
def layer_sensitivity(cfg: SensitivityConfig, layers: Sequence[int] | None = None) -> SensitivityResult:
    """Measure every layer (or ``layers``) as the module docstring says.

    Raises:
        ValueError: For a deployed checkpoint, or a layer out of range.
    """
    model = StreamingModel(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if model.deployed:
        raise ValueError(f"{cfg.model} is a deployed checkpoint: measure sensitivity on the FP model")
    scheme = _measured_scheme(cfg.scheme)
    n = model.num_blocks
    chosen = sorted(set(range(n) if layers is None else layers))
    if any(i < 0 or i >= n for i in chosen):
        raise ValueError(f"layers {chosen} out of range: the model has {n} layers")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ids = ppl_windows(tokenizer, load_text(cfg.dataset, cfg.split), cfg.seq_len, cfg.windows,
                      source=f"--dataset {cfg.dataset} (split {cfg.split})")
    shape = (ids.shape[0], ids.shape[1], model.hidden_size)
    bs = cfg.batch_size
    float_store = HiddenStore.create(shape, model.dtype, cfg.offload_dir)
    stores: dict[int, HiddenStore] = {}
    try:
        embed(model, ids, float_store, bs)
        cos, sin = model.rotary(ids.shape[1])

        def run(block, store: HiddenStore) -> None:
            for lo in range(0, len(store), bs):
                store.write(lo, block(store.read(lo, lo + bs).to(model.device, model.dtype), cos, sin))

        for idx in tqdm(range(n), desc="sensitivity", unit="block"):
            block = model.load_block(idx)
            for store in stores.values():
                run(block, store)
            if idx in chosen:
                stores[idx] = HiddenStore.create(shape, model.dtype, cfg.offload_dir)
                for lo in range(0, len(float_store), bs):
                    stores[idx].write(lo, float_store.read(lo, lo + bs))
            run(block, float_store)
            if idx in chosen:
                run(freeze(quantize_block(block, scheme, cfg.ignore, lwc=False, lac=False,
                                               prefix=model.family.block_prefix(idx))), stores[idx])
            del block
        norm, weight = model.final_norm(), model.lm_head_weight()
        kl = {i: 0.0 for i in chosen}
        nll = {i: 0.0 for i in chosen}
        float_nll, count = 0.0, 0
        for lo in range(len(float_store)):
            targets = ids[lo, 1:].to(model.device)
            ref = F.log_softmax((norm(float_store.read(lo, lo + 1).to(model.device, model.dtype))[0, :-1]
                                 @ weight.T).float(), -1)
            float_nll += float(-ref.gather(1, targets[:, None]).sum())
            count += targets.numel()
            for i, store in stores.items():
                logp = F.log_softmax((norm(store.read(lo, lo + 1).to(model.device, model.dtype))[0, :-1]
                                      @ weight.T).float(), -1)
                kl[i] += float((ref.exp() * (ref - logp)).sum())
                nll[i] += float(-logp.gather(1, targets[:, None]).sum())
    finally:
        float_store.close()
        for store in stores.values():
            store.close()
    scores = [LayerScore(i, kl[i] / count, math.exp(nll[i] / count)) for i in chosen]
    return SensitivityResult(scores, math.exp(float_nll / count), count, scheme.name,
                             {k: v for k, v in asdict(cfg).items() if k != "ignore"})


def write_plot(result: SensitivityResult, path: str | Path, chosen: Sequence[int] = ()) -> bool:
    """A bar chart of KL per layer (chosen layers highlighted) as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib for %s)", path)
        return False
    layers = [s.layer for s in result.scores]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.25), 3))
    ax.bar(layers, [s.kl for s in result.scores], color=["C3" if i in chosen else "C0" for i in layers])
    ax.set_xlabel("layer quantized alone")
    ax.set_ylabel("KL(float || quantized)")
    ax.set_title(f"{result.scheme} RTN sensitivity (float ppl {result.float_ppl:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def recipe_yaml(base: Recipe, bf16_layers: Sequence[int], note: str = "") -> str:
    """Recipe text: ``base`` with ``bf16_layers`` replaced (comments ``note`` on top)."""
    data: dict = {"version": RECIPE_VERSION, "scheme": base.scheme}
    if base.options:
        data["options"] = dict(base.options)
    if base.ignore:
        data["ignore"] = base.ignore_patterns()
    if base.overrides:
        data["overrides"] = [{"targets": [t.pattern for t in o.targets],
                              **({"scheme": o.scheme} if o.scheme else {}), **({"act": o.act} if o.act else {})}
                             for o in base.overrides]
    data["bf16_layers"] = format_layer_ranges(bf16_layers)
    if base.training:
        data["training"] = dict(base.training)
    head = "".join(f"# {line}\n" for line in note.splitlines())
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
