"""Dump the FP hidden states entering every block for calibration, resumably."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from ..models.streaming import HiddenStore, StreamingModel
from ..utils.checkpoint import model_fingerprint
from ..utils.data import calibration_samples, load_text
from ..utils.io import atomic_file, remove_stale_temps
from .dump import (MANIFEST, TOKENS, DumpError, DumpFiles, DumpManifest, HiddenDump, boundary_path,
                   write_tensor_streaming)

log = logging.getLogger(__name__)
DUMP_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ExtractConfig:
    """Calibration dump settings.

    Attributes:
        model: Hugging Face model folder.
        output_dir: dump folder.
        dataset: ``wikitext2`` or a local text path.
        split: dataset split (``train`` for calibration).
        n_samples: number of random windows.
        seq_len: tokens per window.
        seed: window sampling seed.
        device: where blocks run.
        dtype: compute dtype; the dump itself is always bf16, and every block
            reads the bf16 boundary, so a resumed run equals an uninterrupted one.
        batch_size: windows per forward.
    """

    model: str
    output_dir: str
    dataset: str = "wikitext2"
    split: str = "train"
    n_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 1

    def __post_init__(self):
        for name in ("n_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def dump_bytes(num_blocks: int, n_samples: int, seq_len: int, hidden: int) -> int:
    """Disk used by a full dump: ``num_blocks + 1`` boundaries of bf16 states."""
    return (num_blocks + 1) * n_samples * seq_len * hidden * DUMP_DTYPE.itemsize


def _existing_boundaries(out: Path, num_blocks: int) -> int:
    """Number of consecutive boundary files present from 0."""
    done = 0
    while done <= num_blocks and boundary_path(out, done).is_file():
        done += 1
    return done


def _check_disk(out: Path, model: StreamingModel, cfg: ExtractConfig, done: int) -> None:
    """Refuse to start when the boundaries still to write do not fit on the disk of ``out``."""
    total = dump_bytes(model.num_blocks, cfg.n_samples, cfg.seq_len, model.hidden_size)
    need = total - done * (total // (model.num_blocks + 1))
    free = shutil.disk_usage(out).free
    log.info("dump of %d boundaries x [%d, %d, %d] bf16 = %.2f GiB in %s (%.2f GiB still to write, %.2f GiB free)",
             model.num_blocks + 1, cfg.n_samples, cfg.seq_len, model.hidden_size, total / 2**30, out,
             need / 2**30, free / 2**30)
    if need > free:
        raise DumpError(f"{out} has {free / 2**30:.2f} GiB free but the dump needs {need / 2**30:.2f} GiB more; "
                        "free space, lower --n_samples / --seq_len, or choose another --output_dir")


def extract_calibration(cfg: ExtractConfig) -> DumpManifest:
    """Stream the model over calibration windows and dump every block boundary.

    A rerun skips finished boundaries and resumes from the last one, after checking
    that every finished file is the one its record in the manifest describes; a
    folder made for another model or other data is refused.

    Returns:
        The dump's manifest.
    """
    out = Path(cfg.output_dir)
    model = StreamingModel(cfg.model, device=cfg.device, dtype=cfg.dtype)
    manifest = DumpManifest(
        model_fingerprint=model_fingerprint(model.reader),
        model_type=model.config.model_type,
        num_blocks=model.num_blocks,
        hidden_size=model.hidden_size,
        dataset=str(Path(cfg.dataset).resolve()) if Path(cfg.dataset).exists() else cfg.dataset,
        split=cfg.split,
        n_samples=cfg.n_samples,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
    )
    if (out / MANIFEST).is_file():
        diff = DumpManifest.load(out).mismatch(manifest)
        if diff:
            raise DumpError(
                f"{out} holds a dump made with other settings ({'; '.join(diff)}). "
                "Use another --output_dir or delete that folder."
            )
        legacy = DumpFiles(out).records is None
    else:
        legacy = False
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(out):
        log.info("removed %s, left by an interrupted run", stale.name)
    done = _existing_boundaries(out, model.num_blocks)
    finished = [out / TOKENS] * (out / TOKENS).is_file() + [boundary_path(out, i) for i in range(done)]
    complete = done == model.num_blocks + 1
    if not complete:
        _check_disk(out, model, cfg, done)
    manifest.save(out)
    files = DumpFiles(out)
    if legacy:
        files.adopt(finished)
    for path in finished:  # what is reused must be what was written
        files.check(path)
    if complete:
        log.info("%s is complete (%d boundaries): nothing to do", out, done)
        return manifest

    if (out / TOKENS).is_file():
        tokens = load_file(out / TOKENS)["input_ids"]
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        text = load_text(cfg.dataset, cfg.split)
        tokens = calibration_samples(tokenizer, text, cfg.n_samples, cfg.seq_len, cfg.seed,
                                     source=f"--dataset {cfg.dataset} (split {cfg.split})")
        with atomic_file(out / TOKENS) as tmp:
            save_file({"input_ids": tokens.contiguous()}, str(tmp))
            files.record(TOKENS, tmp)

    shape = (cfg.n_samples, cfg.seq_len, model.hidden_size)
    with HiddenStore.create(shape, DUMP_DTYPE) as store:
        if done == 0:
            model.embed(tokens, store, cfg.batch_size)
            start = 0
        else:
            start = done - 1
            log.info("resuming from %s", boundary_path(out, start).name)
            prev = HiddenDump(boundary_path(out, start))
            for lo in range(0, cfg.n_samples, cfg.batch_size):
                store.write(lo, prev.read(lo, lo + cfg.batch_size))

        def save_boundary(idx: int, states: HiddenStore) -> None:
            path = boundary_path(out, idx)
            if not path.is_file():
                write_tensor_streaming(path, states, cfg.batch_size, metadata={"boundary": str(idx)}, files=files)

        model.run_blocks(store, cfg.batch_size, range(start, model.num_blocks), on_block_input=save_boundary)
        save_boundary(model.num_blocks, store)
    log.info("dump complete: %s", out)
    return manifest
