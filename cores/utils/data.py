"""Text for calibration and perplexity: Wikitext-2 from the local cache, or any local text.

Nothing here reaches the network. ``wikitext2`` is looked up in the Hugging Face hub cache
(parquet files) and the ``datasets`` cache (Arrow files); a path may be a ``.txt``, ``.parquet``
or ``.raw`` file, or a folder. Row-based sources (parquet, Arrow, Wikitext ``.raw`` lines) are
joined with blank lines, as GPTQ and OmniQuant join the dataset's ``text`` column, so the
same Wikitext split gives the same string whichever form it is stored in.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from huggingface_hub import constants as hub_constants

log = logging.getLogger(__name__)

WIKITEXT2 = "wikitext2"
WIKITEXT2_CONFIG = "wikitext-2-raw-v1"
_HUB_REPOS = ("datasets--Salesforce--wikitext", "datasets--wikitext")  # the current id, then the legacy one
_DATASETS_CACHE_NAMES = ("Salesforce___wikitext", "wikitext")

_SPLIT_NAMES = {"test": "test", "eval": "test", "validation": "validation", "valid": "validation",
                "val": "validation", "train": "train"}
_TXT_STEMS = {"test": ("test", "eval"), "validation": ("validation", "valid", "val"), "train": ("train",)}
_RAW_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}


class DatasetNotFoundError(FileNotFoundError):
    """The requested text is not on this machine."""


def load_text(dataset: str | Path, split: str = "test") -> str:
    """The text of one split of a dataset, as one string.

    Args:
        dataset: ``wikitext2`` (Wikitext-2 raw from the local Hugging Face cache), or a path:
            a ``.txt`` file (its contents), a ``.parquet`` file (its ``text`` column), a Wikitext
            ``.raw`` file, or a folder holding either Wikitext files (``<split>-*.parquet``, also
            under ``wikitext-2-raw-v1/``, or ``wiki.<split>.raw``), a ``<split>.txt``, or plain
            ``.txt`` documents (all of them, in name order).
        split: ``test`` (alias ``eval``), ``validation`` (``valid``, ``val``) or ``train``.

    Returns:
        The text, rows or documents joined with blank lines.

    Raises:
        DatasetNotFoundError: the dataset or the split is not on this machine.
        ValueError: unknown split or file type, or the text is empty.
    """
    split = _canonical_split(split)
    if str(dataset) == WIKITEXT2:
        return _cached_wikitext2(split)
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path}: no such file or folder (pass `{WIKITEXT2}`, a .txt / .parquet file or a folder)")
    text = _folder_text(path, split) if path.is_dir() else _file_text(path)
    if not text.strip():
        raise ValueError(f"{path}: holds no text for split '{split}'")
    return text


def ppl_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None,
                source: str = "the text") -> torch.LongTensor:
    """Tokenize ``text`` once and cut it into non-overlapping windows, dropping the tail (GPTQ protocol).

    Args:
        tokenizer: a Hugging Face tokenizer; special tokens are whatever it adds by default.
        text: the whole split.
        seq_len: tokens per window.
        max_windows: keep only the first N windows (None: all).
        source: names the text in errors.

    Returns:
        Token ids of shape ``[n_windows, seq_len]``.
    """
    ids = _token_ids(tokenizer, text)
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"{source} has {ids.numel()} tokens, fewer than one window of --seq_len {seq_len}: "
                         "give more text or a smaller --seq_len")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def calibration_samples(tokenizer, text: str, n_samples: int, seq_len: int, seed: int,
                        source: str = "the text") -> torch.LongTensor:
    """Random windows of ``seq_len`` tokens from ``text`` (GPTQ style), the same for the same seed.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the calibration text, tokenized once.
        n_samples: how many windows.
        seq_len: tokens per window.
        seed: seeds the ``torch.Generator`` that draws the start offsets.
        source: names the text in errors.

    Returns:
        Token ids of shape ``[n_samples, seq_len]``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    ids = _token_ids(tokenizer, text)
    if ids.numel() < seq_len:
        raise ValueError(f"{source} has {ids.numel()} tokens, fewer than one sample of --seq_len {seq_len}: "
                         "give more text or a smaller --seq_len")
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


def _token_ids(tokenizer, text: str) -> torch.LongTensor:
    """The whole text's token ids, 1-D; ``verbose=False`` silences the longer-than-the-model warning."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def _canonical_split(split: str) -> str:
    try:
        return _SPLIT_NAMES[split.lower()]
    except KeyError:
        raise ValueError(f"unknown split '{split}'; expected one of {sorted(_SPLIT_NAMES)}") from None


def _cached_wikitext2(split: str) -> str:
    """Wikitext-2 raw from the hub cache (parquet) or the ``datasets`` cache (Arrow); never downloads."""
    hub_cache = Path(hub_constants.HF_HUB_CACHE)
    for repo in _HUB_REPOS:
        for snapshot in sorted((hub_cache / repo / "snapshots").glob("*")):
            if shards := _parquet_shards(snapshot / WIKITEXT2_CONFIG, split):
                log.info("Wikitext-2 %s from %s", split, shards[0].parent)
                return _join(row for shard in shards for row in _parquet_rows(shard))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(hub_constants.HF_HOME) / "datasets")
    for name in _DATASETS_CACHE_NAMES:
        for build in sorted((datasets_cache / name / WIKITEXT2_CONFIG).glob("*/*")):
            if shards := sorted(build.glob(f"wikitext-{split}*.arrow")):
                log.info("Wikitext-2 %s from %s", split, build)
                return _join(row for shard in shards for row in _arrow_rows(shard))
    raise DatasetNotFoundError(
        f"Wikitext-2 ({WIKITEXT2_CONFIG}, split '{split}') is not in the local Hugging Face cache (looked under "
        f"{hub_cache} and {datasets_cache}), and nothing here downloads it. Either: (1) on a machine with network "
        f"run `hf download Salesforce/wikitext --repo-type dataset --include '{WIKITEXT2_CONFIG}/*' --local-dir "
        f"wikitext`, copy the `wikitext` folder here and pass its path as the dataset; or (2) copy a Hugging Face "
        f"cache that holds it (e.g. after `datasets.load_dataset('Salesforce/wikitext', '{WIKITEXT2_CONFIG}')`) to "
        f"{hub_constants.HF_HOME} or point HF_HOME at it; or (3) pass any local .txt / .parquet file or folder, "
        f"e.g. assets/corpus (see scripts/prepare_assets.py)."
    )


def _file_text(path: Path) -> str:
    if path.suffix == ".txt":
        return _read_utf8(path)
    if path.suffix == ".parquet":
        return _join(_parquet_rows(path))
    if path.suffix == ".raw":
        return _join(_raw_rows(path))
    raise ValueError(f"{path}: unsupported file type (expected .txt, .parquet or .raw)")


def _folder_text(folder: Path, split: str) -> str:
    """A folder's text for ``split``: Wikitext parquet or raw files, ``<split>.txt``, else every ``.txt``."""
    for base in (folder, folder / WIKITEXT2_CONFIG):
        if shards := _parquet_shards(base, split):
            return _join(row for shard in shards for row in _parquet_rows(shard))
    for base in (folder, folder / "wikitext-2-raw"):
        if (raw := base / _RAW_FILES[split]).is_file():
            return _join(_raw_rows(raw))
    for stem in _TXT_STEMS[split]:
        if (txt := folder / f"{stem}.txt").is_file():
            return _read_utf8(txt)
    docs = sorted(folder.glob("*.txt"))
    split_files = [p.name for p in docs if p.stem in _SPLIT_NAMES]
    if split_files:
        raise DatasetNotFoundError(f"{folder}: has {split_files} but nothing for split '{split}'")
    if not docs:
        raise DatasetNotFoundError(
            f"{folder}: no text for split '{split}' (expected {split}-*.parquet, {_RAW_FILES[split]}, "
            f"{' / '.join(s + '.txt' for s in _TXT_STEMS[split])} or plain .txt files)")
    log.warning("%s: no split files; using all %d .txt files for split '%s'", folder, len(docs), split)
    return "\n\n".join(_read_utf8(p) for p in docs)


def _parquet_shards(folder: Path, split: str) -> list[Path]:
    """``<split>-*.parquet`` (Hub layout) or ``<split>/*.parquet`` (parquet-conversion layout)."""
    return sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}/*.parquet"))


def _parquet_rows(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def _arrow_rows(path: Path) -> list[str]:
    """Rows of a ``datasets`` cache file (Arrow IPC stream)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().column("text").to_pylist()


def _read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 text (a binary file) is refused by name."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); pass a text file") from None


def _raw_rows(path: Path) -> list[str]:
    """A Wikitext ``.raw`` file as the dataset's rows: one per line, blank lines as empty strings."""
    return [line if line.strip() else "" for line in io.StringIO(_read_utf8(path))]


def _join(rows: Iterable[str]) -> str:
    return "\n\n".join(rows)
