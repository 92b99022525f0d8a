"""Perplexity by the GPTQ / OmniQuant protocol over the streaming runtime.

Join the split with blank lines, tokenize once, cut non-overlapping windows of
``seq_len`` tokens, average the next-token NLL over every predicted token of every
window, exponentiate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoTokenizer

from ..calibrator.params import open_params
from ..models.run import BlockTransform, sequence_nll
from ..models.streaming import StreamingModel
from ..utils.checkpoint import model_fingerprint
from ..utils.data import load_text, ppl_windows
from ..utils.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PplConfig:
    """What to evaluate and how.

    Attributes:
        model: Hugging Face model folder.
        dataset: ``wikitext2`` or a path to a text file / folder / parquet.
        split: dataset split (``test`` for evaluation).
        seq_len: window length in tokens.
        device: ``cpu`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        batch_size: windows per forward.
        max_windows: evaluate only the first N windows (None: all).
        offload_dir: keep hidden states in a file here instead of RAM.
        param_dir: evaluate the fake-quantized model with these learned params.
        mla_param_path: params of ``--train_mode mla`` kept in a dir of their own (the seed's spelling).
        moe_param_path: params of ``--train_mode moe`` kept in a dir of their own.
    """

    model: str
    dataset: str = "wikitext2"
    split: str = "test"
    seq_len: int = 2048
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 1
    max_windows: int | None = None
    offload_dir: str | None = None
    param_dir: str | None = None
    mla_param_path: str | None = None
    moe_param_path: str | None = None

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {self.max_windows}")


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    tokens_per_s: float
    model: str
    dataset: str
    dtype: str
    device: str
    param_dir: str | None = None
    deployed: bool = False


def evaluate_ppl(cfg: PplConfig, block_transform: BlockTransform | None = None) -> PplResult:
    """Evaluate perplexity of ``cfg.model`` on ``cfg.dataset``.

    Args:
        cfg: evaluation settings; with ``param_dir`` every block is fake-quantized
            with its learned params (the forward that deploy ships).
        block_transform: optional ``(idx, block) -> block`` applied instead.

    Returns:
        The result; ``tokens`` counts predicted tokens (``seq_len - 1`` per window),
        ``tokens_per_s`` counts every token pushed through the model.
    """
    model = StreamingModel(cfg.model, device=cfg.device, dtype=cfg.dtype)
    params = open_params(cfg.param_dir, cfg.mla_param_path, cfg.moe_param_path)
    if params is not None:
        if model.deployed:
            raise ValueError(f"{cfg.model} is a deployed (compressed-tensors) checkpoint: it already carries its "
                             "quantization; --param_dir applies to the float model it was made from")
        params.check_model(model_fingerprint(model.reader))
        block_transform = params.block_transform(model.num_blocks, block_prefix=model.family.block_prefix)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        log.warning("seq_len %d exceeds the model's max_position_embeddings %d", cfg.seq_len, max_pos)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    windows = ppl_windows(tokenizer, load_text(cfg.dataset, cfg.split), cfg.seq_len, cfg.max_windows,
                          source=f"--dataset {cfg.dataset} (split {cfg.split})")
    log.info("%s: %d windows of %d tokens, %s on %s", cfg.dataset, len(windows), cfg.seq_len, model.dtype, model.device)
    start = time.perf_counter()
    nll, tokens = sequence_nll(model, windows, cfg.batch_size, cfg.offload_dir, block_transform)
    seconds = time.perf_counter() - start
    return PplResult(
        ppl=math.exp(nll / tokens),
        nll=nll / tokens,
        tokens=tokens,
        windows=len(windows),
        seq_len=cfg.seq_len,
        seconds=seconds,
        tokens_per_s=windows.numel() / seconds,
        model=str(cfg.model),
        dataset=str(cfg.dataset),
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        param_dir=cfg.param_dir,
        deployed=model.deployed,
    )


def write_result(result: PplResult, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(asdict(result), indent=2) + "\n")
