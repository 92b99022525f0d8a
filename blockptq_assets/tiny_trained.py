"""A tiny DeepSeek-V3 trained on the corpus: a real MoE checkpoint for end-to-end tests and benchmarks.

:func:`ensure_tiny_deepseek` trains it once (a few minutes on one CPU thread) and caches two
Hugging Face folders beside the other assets:

- ``tiny-deepseek-v3``: bf16 weights under DeepSeek's on-disk names (MLA projections with a
  query latent, a dense first block, per-expert linears, ``mlp.gate`` with an fp32
  ``e_score_correction_bias``, shared experts), the SmolLM2 tokenizer, a generation config;
- ``tiny-deepseek-v3-fp8``: the same model in DeepSeek's FP8 layout (e4m3 weights with a
  ``weight_scale_inv`` per 128x128 tile and the FP8 ``quantization_config``), as V3 ships.

The model is made of our own block modules (those the streaming runtime runs), initialised by
``transformers`` through :func:`~blockptq_assets.tiny.make_tiny_checkpoint`, and trained with AdamW
on random windows of the train split. Three things make a few CPU minutes worth it:

- the tied embedding starts from the top principal directions of SmolLM2's embedding;
- tokens that never occur in the training windows share one output row: the full-vocabulary
  softmax then equals a softmax over the seen rows plus that row's logit + log(number unseen),
  which halves the cost of the 49152-way output and is exact for the saved model, whose unseen
  rows all hold the shared vector;
- routers stay balanced by DeepSeek-V3's auxiliary-loss-free update of ``e_score_correction_bias``.

A few CPU minutes of training leave the activations without the outlier channels of real LLMs
(a few hidden dimensions, the same in every block, that carry values ten to a hundred times the
rest: the reason 8-bit activations need clipping or smoothing). Without them the model does not
notice quantization (4-bit RTN moved its ppl by -0.03 %) and learned clipping cannot be told from
RTN. The saved model therefore has them planted (:func:`plant_outlier_channels`): a few channels
of every RMSNorm weight are multiplied by ``outlier_scale`` and the matching input columns of the
linears that read that norm are divided by it. The float function is unchanged (a power-of-two
scale is exact in bf16); only what quantizers see changes, as in a real checkpoint.

Each folder is built under a ``.partial`` name and renamed into place when complete. Its
``tiny_model.json`` records a fingerprint of the settings, the corpus and the tokenizer; a folder
whose fingerprint differs from the current one is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from cores.models.moe import RoutingCounter
from cores.models.registry import ModelFamily
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel
from cores.utils.checkpoint import CheckpointReader
from cores.utils.data import calibration_samples, load_text, ppl_windows
from cores.utils.io import atomic_write_text

from .assets import CORPUS_DIR_NAME, DEFAULT_ASSETS_DIR, MODEL_DIR_NAME, AssetError, build_once
from .tiny import fp8_twins, make_tiny_checkpoint

log = logging.getLogger(__name__)

MODEL_NAME = "tiny-deepseek-v3"
FP8_NAME = "tiny-deepseek-v3-fp8"
RECORD_NAME = "tiny_model.json"
FORMAT_VERSION = 1
"""Bump when the training code changes what a given set of settings produces."""

_TOKENIZER_SOURCE = "tokenizer.json"


@dataclass(frozen=True)
class TinyDeepseekSettings:
    """Architecture and training budget of the tiny model (every field enters the cache fingerprint).

    Input widths of every linear a scheme quantizes are multiples of 128, so W4 groups of 128 fit.
    The vocabulary is SmolLM2's; the context is ``seq_len``.
    """

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int = 128
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 32
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.5
    rope_theta: float = 10000.0
    seq_len: int = 512
    batch_size: int = 1
    steps: int = 400
    lr: float = 2e-3
    warmup_steps: int = 15
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_update_speed: float = 0.01
    embed_init_std: float = 0.1
    seed: int = 0
    eval_windows: int = 16
    outlier_channels: int = 4
    outlier_scale: float = 16.0

    def config_overrides(self, vocab_size: int, token_ids: dict[str, int]) -> dict:
        """The ``transformers`` DeepSeek-V3 config fields of this model."""
        return dict(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads, q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
            n_routed_experts=self.n_routed_experts, n_shared_experts=self.n_shared_experts,
            num_experts_per_tok=self.num_experts_per_tok, moe_intermediate_size=self.moe_intermediate_size,
            n_group=self.n_group, topk_group=self.topk_group, first_k_dense_replace=self.first_k_dense_replace,
            norm_topk_prob=True, routed_scaling_factor=self.routed_scaling_factor, rope_interleave=True,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            max_position_embeddings=self.seq_len, tie_word_embeddings=True, rms_norm_eps=1e-6,
            num_nextn_predict_layers=0, **token_ids,
        )


@dataclass(frozen=True)
class TinyDeepseek:
    """The cached folders and what their training recorded.

    Attributes:
        model_dir: the bf16 Hugging Face folder.
        fp8_dir: its FP8 twin (DeepSeek layout).
        record: ``tiny_model.json``: settings, fingerprint, train time and losses, eval ppl,
            tokens per routed expert on the eval windows.
    """

    model_dir: Path
    fp8_dir: Path
    record: dict


def ensure_tiny_deepseek(
    assets_dir: str | Path = DEFAULT_ASSETS_DIR, settings: TinyDeepseekSettings = TinyDeepseekSettings()
) -> TinyDeepseek:
    """Train and cache the tiny DeepSeek-V3 and its FP8 twin unless an up-to-date copy is there.

    Safe to call from several processes at once: they take turns on a lock file.

    Args:
        assets_dir: the assets root holding ``smollm2-135m`` (tokenizer, embedding init) and
            ``corpus`` (train / eval splits); the two folders are written there too.
        settings: architecture and training budget.

    Returns:
        The two folders and the training record.

    Raises:
        AssetError: the SmolLM2 folder or the corpus is missing (``scripts/prepare_assets.py`` builds them).
    """
    root = Path(assets_dir).resolve()
    smollm2, corpus = root / MODEL_DIR_NAME, root / CORPUS_DIR_NAME
    _require_sources(smollm2, corpus)
    fingerprint = settings_fingerprint(settings, smollm2, corpus)
    model_dir, fp8_dir = root / MODEL_NAME, root / FP8_NAME
    with FileLock(root / ".tiny-deepseek.lock"):
        if not _is_current(model_dir, fingerprint):
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(fp8_dir, ignore_errors=True)  # a twin of the old weights
            log.info("training %s (fingerprint %s): a few minutes on one CPU thread", MODEL_NAME, fingerprint[:12])
        build_once(model_dir, lambda out: train_tiny_deepseek(out, smollm2, corpus, settings, fingerprint))
        if not _is_current(fp8_dir, fingerprint):
            shutil.rmtree(fp8_dir, ignore_errors=True)
        build_once(fp8_dir, lambda out: write_fp8_twin(model_dir, out))
    return TinyDeepseek(model_dir, fp8_dir, json.loads((model_dir / RECORD_NAME).read_text()))


def settings_fingerprint(settings: TinyDeepseekSettings, smollm2_dir: Path, corpus_dir: Path) -> str:
    """sha256 of the settings, the code version, the train split and the tokenizer."""
    payload = {
        "format": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "train_sha256": _sha256_file(corpus_dir / "train.txt"),
        "tokenizer_sha256": _sha256_file(smollm2_dir / _TOKENIZER_SOURCE),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def train_tiny_deepseek(
    out_dir: Path, smollm2_dir: Path, corpus_dir: Path, settings: TinyDeepseekSettings, fingerprint: str
) -> dict:
    """Train the model and write its bf16 folder (weights, config, tokenizer, record) into ``out_dir``.

    Returns:
        The record written to ``tiny_model.json``.
    """
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    source_config = json.loads((smollm2_dir / "config.json").read_text())
    token_ids = {k: source_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source_config}
    windows = calibration_samples(tokenizer, load_text(corpus_dir / "train.txt"), settings.steps * settings.batch_size,
                                  settings.seq_len + 1, settings.seed)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        init_dir = make_tiny_checkpoint(Path(tmp), "deepseek_v3", seed=settings.seed,
                                        **settings.config_overrides(source_config["vocab_size"], token_ids))
        init = StreamingModel(init_dir, dtype=torch.float32)
        model = _TinyLM(init, _embedding_init(smollm2_dir, settings.hidden_size, settings.embed_init_std))
        config = json.loads((init_dir / "config.json").read_text())
    start = time.perf_counter()
    losses = _train(model, init.rotary(settings.seq_len), windows, settings)
    train_seconds = time.perf_counter() - start
    outliers = {str(width): channels.tolist() for width, channels in plant_outlier_channels(
        model.layers, settings.outlier_channels, settings.outlier_scale, settings.seed).items()}

    _save(model, init.family, out_dir)
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2) + "\n")
    GenerationConfig(**token_ids).save_pretrained(out_dir)
    tokenizer.model_max_length = settings.seq_len
    tokenizer.save_pretrained(out_dir)

    eval_ids = ppl_windows(tokenizer, load_text(corpus_dir / "eval.txt"), settings.seq_len, settings.eval_windows)
    counter = RoutingCounter()
    nll, count = sequence_nll(StreamingModel(out_dir, dtype=torch.float32), eval_ids, batch_size=4,
                              block_transform=counter.attach)
    record = {
        "fingerprint": fingerprint,
        "format": FORMAT_VERSION,
        "settings": dataclasses.asdict(settings),
        "train_seconds": round(train_seconds, 1),
        "train_tokens": settings.steps * settings.batch_size * settings.seq_len,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "losses": losses,
        "unseen_tokens": int(model.unseen.sum()),
        "outlier_channels": {"scale": settings.outlier_scale, "channels_by_width": outliers},
        "eval": {"split": "corpus/eval.txt", "seq_len": settings.seq_len, "windows": len(eval_ids),
                 "tokens": count, "ppl": math.exp(nll / count)},
        "expert_tokens": {str(idx): counts.tolist() for idx, counts in sorted(counter.counts.items())},
    }
    atomic_write_text(out_dir / RECORD_NAME, json.dumps(record, indent=2) + "\n")
    log.info("%s: trained %d tokens in %.0f s, eval ppl %.2f", MODEL_NAME, record["train_tokens"], train_seconds,
             record["eval"]["ppl"])
    return record


@torch.no_grad()
def plant_outlier_channels(layers: nn.ModuleList, count: int, scale: float, seed: int) -> dict[int, torch.Tensor]:
    """Give ``count`` channels of every RMSNorm output ``scale`` times their magnitude, the function unchanged.

    Each norm weight is multiplied by ``scale`` on the chosen channels and every linear that reads
    that norm's output has those input columns divided by it: the block's input norms feed the
    attention's first projections (``q_a_proj`` / ``q_proj``, ``kv_a_proj_with_mqa``) and every
    MLP input (router, routed and shared experts' ``gate_proj`` / ``up_proj``); the MLA latent
    norms feed ``q_b_proj`` and ``kv_b_proj``. The channels are drawn once per width from
    ``seed`` and are the same in every block, like the fixed outlier dimensions of real LLMs.

    Args:
        layers: the decoder blocks (MLA attention, dense or MoE MLP), changed in place.
        count: channels per norm; 0 plants nothing.
        scale: the factor; a power of two keeps bf16 weights exact.
        seed: seeds the channel choice.

    Returns:
        The chosen channels by norm width.
    """
    chosen: dict[int, torch.Tensor] = {}
    if count == 0:
        return chosen

    def plant(norm: nn.Module, readers: list[torch.Tensor]) -> None:
        width = norm.weight.shape[0]
        if width not in chosen:
            chosen[width] = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:count].sort().values
        norm.weight[chosen[width]] *= scale
        for weight in readers:
            weight[:, chosen[width]] /= scale

    for layer in layers:
        attn = layer.self_attn
        first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        plant(layer.input_layernorm, [first.weight, attn.kv_a_proj_with_mqa.weight])
        if attn.q_lora_rank is not None:
            plant(attn.q_a_layernorm, [attn.q_b_proj.weight])
        plant(attn.kv_a_layernorm, [attn.kv_b_proj.weight])
        mlp_inputs = [module.weight for name, module in layer.mlp.named_modules()
                      if name == "gate" or name.endswith(("gate_proj", "up_proj"))]
        plant(layer.post_attention_layernorm, mlp_inputs)
    return chosen


def _save(model: _TinyLM, family: ModelFamily, out_dir: Path) -> None:
    """The weights under the checkpoint names of ``family``: bf16, router correction biases fp32."""
    state = {family.embed_key: model.embedding(), family.norm_key: model.norm.weight}
    for idx, layer in enumerate(model.layers):
        state.update({family.block_prefix(idx) + k: v for k, v in layer.state_dict().items()})
    keep = family.fp32_suffixes
    state = {k: v.detach().to(torch.float32 if k.endswith(keep) else torch.bfloat16).contiguous()
             for k, v in state.items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def write_fp8_twin(model_dir: Path, out_dir: Path) -> None:
    """Write the FP8 (DeepSeek layout) copy of ``model_dir`` into ``out_dir``, with its side files."""
    fp8_twins(model_dir, out_dir)
    for path in model_dir.iterdir():
        if path.is_file() and path.name != "config.json" and path.suffix != ".safetensors":
            shutil.copy2(path, out_dir / path.name)


class _TinyLM(nn.Module):
    """Embedding, the decoder blocks of a :class:`StreamingModel` and its final norm, trainable.

    The output layer is the embedding (tied). Tokens that no training window holds
    (``unseen``) share the output row ``shared``; :meth:`loss` is the full-vocabulary
    cross-entropy under that constraint, and :meth:`embedding` writes ``shared`` into their rows.
    """

    def __init__(self, init, embed: torch.Tensor):
        super().__init__()
        self.embed = nn.Parameter(embed.clone())
        self.layers = nn.ModuleList(init.load_block(idx) for idx in range(init.num_blocks))
        self.norm = init.final_norm()
        self.shared = nn.Parameter(torch.zeros(embed.shape[1]))
        self.register_buffer("unseen", torch.ones(embed.shape[0], dtype=torch.bool))
        self.requires_grad_(True).train()

    def set_seen(self, token_ids: torch.Tensor) -> None:
        """Mark the tokens of the training windows; the shared row starts at the mean of the others."""
        self.unseen.fill_(True)
        self.unseen[token_ids.unique()] = False
        self.seen = (~self.unseen).nonzero().squeeze(1)
        self.position = torch.full_like(self.unseen, -1, dtype=torch.long)
        self.position[self.seen] = torch.arange(len(self.seen))
        self.log_unseen = math.log(int(self.unseen.sum())) if self.unseen.any() else float("-inf")
        with torch.no_grad():
            self.shared.copy_(self.embed[self.unseen].mean(0) if self.unseen.any() else 0)

    def loss(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``ids`` ``[batch, seq + 1]`` over the whole vocabulary."""
        hidden = F.embedding(ids[:, :-1], self.embed)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin)
        hidden = self.norm(hidden).reshape(-1, self.embed.shape[1])
        logits = torch.cat((hidden @ self.embed[self.seen].T, (hidden @ self.shared + self.log_unseen)[:, None]), 1)
        return F.cross_entropy(logits, self.position[ids[:, 1:].reshape(-1)])

    @torch.no_grad()
    def embedding(self) -> torch.Tensor:
        """The embedding to save: trained rows, and the shared row wherever a token was unseen."""
        out = self.embed.detach().clone()
        out[self.unseen] = self.shared.detach()
        return out


def _train(model: _TinyLM, rotary: tuple[torch.Tensor, torch.Tensor], windows: torch.Tensor,
           s: TinyDeepseekSettings) -> list[dict]:
    """AdamW with warm-up and cosine decay, router biases balanced after every step; returns the loss curve."""
    model.set_seen(windows)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * step / s.steps))
        return min(1.0, (step + 1) / s.warmup_steps) * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    counter = RoutingCounter()
    for idx, layer in enumerate(model.layers):
        counter.attach(idx, layer)
    cos, sin = rotary
    curve, running = [], []
    bar = tqdm(range(s.steps), desc=f"{MODEL_NAME}: train", unit="step")
    for step in bar:
        counter.counts.clear()
        loss = model.loss(windows[step * s.batch_size:(step + 1) * s.batch_size], cos, sin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():  # DeepSeek-V3's auxiliary-loss-free balancing
            for idx, load in counter.counts.items():
                gate, load = model.layers[idx].mlp.gate, load.float()
                gate.e_score_correction_bias += s.bias_update_speed * torch.sign(load.mean() - load)
        running.append(loss.item())
        if len(running) == 25 or step == s.steps - 1:
            curve.append({"step": step + 1, "loss": round(sum(running) / len(running), 4)})
            bar.set_postfix(loss=curve[-1]["loss"])
            running = []
    return curve


def _embedding_init(smollm2_dir: Path, width: int, std: float) -> torch.Tensor:
    """SmolLM2's token embedding projected on its top ``width`` principal directions, scaled to ``std``."""
    key = "model.embed_tokens.weight"
    embed = CheckpointReader(smollm2_dir).read([key])[key].float()
    _, vectors = torch.linalg.eigh(embed.T @ embed)  # ascending eigenvalues
    projected = embed @ vectors[:, -width:].flip(-1)
    return projected * (std / projected.std())


def _require_sources(smollm2_dir: Path, corpus_dir: Path) -> None:
    needed = [smollm2_dir / "config.json", smollm2_dir / _TOKENIZER_SOURCE, smollm2_dir / "model.safetensors",
              corpus_dir / "train.txt", corpus_dir / "eval.txt"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise AssetError(
            f"the tiny DeepSeek-V3 is trained with the SmolLM2 tokenizer on the corpus, and {', '.join(missing)} "
            f"is missing: run `python scripts/prepare_assets.py --assets_dir {smollm2_dir.parent}` first"
        )


def _is_current(folder: Path, fingerprint: str) -> bool:
    try:
        return json.loads((folder / RECORD_NAME).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
