"""Dump the FP hidden states entering every block for calibration, resumably.

In parts: :func:`dump_manifest` says what the dump is made of; :func:`open_folder` refuses a
folder of other settings and finds where an earlier run stopped (:class:`Progress`);
:func:`check_disk` refuses a dump that cannot fit; :func:`check_finished` checks the files
to reuse; :func:`calibration_tokens` samples (or reloads) the token windows;
:func:`write_boundaries` runs the blocks and writes each missing boundary.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from ..models.hidden_store import HiddenStore
from ..models.run import embed, run_blocks
from ..models.streaming import StreamingModel
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


def check_disk(out: Path, model: StreamingModel, cfg: ExtractConfig, done: int) -> None:
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


@dataclass(frozen=True)
class Progress:
    """What earlier runs left in a dump folder.

    Attributes:
        done: boundary files present, consecutive from 0.
        num_blocks: the model's blocks (a complete dump has ``num_blocks + 1`` boundaries).
        legacy: a dump written before per-file records: its finished files are adopted, not checked.
    """

    done: int
    num_blocks: int
    legacy: bool

    @property
    def complete(self) -> bool:
        return self.done == self.num_blocks + 1

    def finished(self, out: Path) -> list[Path]:
        """The files to reuse: the tokens (when written) and the boundaries present."""
        return [out / TOKENS] * (out / TOKENS).is_file() + [boundary_path(out, i) for i in range(self.done)]


def dump_manifest(cfg: ExtractConfig, model: StreamingModel) -> DumpManifest:
    """The manifest of ``cfg``'s dump of ``model`` (a local dataset named by its absolute path)."""
    return DumpManifest(
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


def open_folder(out: Path, manifest: DumpManifest) -> Progress:
    """Create ``out`` or check that it holds a dump of ``manifest``'s settings, clear what dead runs left, and
    find where to resume.

    Raises:
        DumpError: for a folder holding a dump of other settings.
    """
    legacy = False
    if (out / MANIFEST).is_file():
        diff = DumpManifest.load(out).mismatch(manifest)
        if diff:
            raise DumpError(
                f"{out} holds a dump made with other settings ({'; '.join(diff)}). "
                "Use another --output_dir or delete that folder."
            )
        legacy = DumpFiles(out).records is None
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(out):
        log.info("removed %s, left by an interrupted run", stale.name)
    return Progress(_existing_boundaries(out, manifest.num_blocks), manifest.num_blocks, legacy)


def check_finished(out: Path, progress: Progress) -> DumpFiles:
    """The dump's file records, after checking that every finished file is the one recorded (a legacy dump's
    files are recorded as they are)."""
    finished = progress.finished(out)
    files = DumpFiles(out)
    if progress.legacy:
        files.adopt(finished)
    for path in finished:  # what is reused must be what was written
        files.check(path)
    return files


def calibration_tokens(cfg: ExtractConfig, out: Path, files: DumpFiles) -> torch.Tensor:
    """The ``[n_samples, seq_len]`` token windows: those of an earlier run, or sampled from the dataset with
    the model's tokenizer and written (and recorded) first."""
    if (out / TOKENS).is_file():
        return load_file(out / TOKENS)["input_ids"]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    text = load_text(cfg.dataset, cfg.split)
    tokens = calibration_samples(tokenizer, text, cfg.n_samples, cfg.seq_len, cfg.seed,
                                 source=f"--dataset {cfg.dataset} (split {cfg.split})")
    with atomic_file(out / TOKENS) as tmp:
        save_file({"input_ids": tokens.contiguous()}, str(tmp))
        files.record(TOKENS, tmp)
    return tokens


def first_inputs(model: StreamingModel, store: HiddenStore, tokens: torch.Tensor, out: Path, done: int,
                 batch_size: int) -> int:
    """Fill ``store`` with the input of the first block still to run and return that block: the embeddings
    (block 0), or the last boundary written (read back from the bf16 file, as an uninterrupted run reads it)."""
    if done == 0:
        embed(model, tokens, store, batch_size)
        return 0
    start = done - 1
    log.info("resuming from %s", boundary_path(out, start).name)
    prev = HiddenDump(boundary_path(out, start))
    for lo in range(0, len(store), batch_size):
        store.write(lo, prev.read(lo, lo + batch_size))
    return start


def write_boundaries(model: StreamingModel, out: Path, files: DumpFiles, tokens: torch.Tensor, done: int,
                     batch_size: int) -> None:
    """Run the blocks from where the dump stops and write the input of each (and the last output) that is
    missing, each streamed to its file and recorded."""

    def save_boundary(idx: int, states: HiddenStore) -> None:
        path = boundary_path(out, idx)
        if not path.is_file():
            write_tensor_streaming(path, states, batch_size, metadata={"boundary": str(idx)}, files=files)

    shape = (len(tokens), tokens.shape[1], model.hidden_size)
    with HiddenStore.create(shape, DUMP_DTYPE) as store:
        start = first_inputs(model, store, tokens, out, done, batch_size)
        run_blocks(model, store, batch_size, range(start, model.num_blocks), on_block_input=save_boundary)
        save_boundary(model.num_blocks, store)


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
    manifest = dump_manifest(cfg, model)
    progress = open_folder(out, manifest)
    if not progress.complete:
        check_disk(out, model, cfg, progress.done)
    manifest.save(out)
    files = check_finished(out, progress)
    if progress.complete:
        log.info("%s is complete (%d boundaries): nothing to do", out, progress.done)
        return manifest
    tokens = calibration_tokens(cfg, out, files)
    write_boundaries(model, out, files, tokens, progress.done, cfg.batch_size)
    log.info("dump complete: %s", out)
    return manifest
