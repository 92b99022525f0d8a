"""A checkpoint folder written shard by shard, staged beside its destination.

The layout is planned before anything is written: every output tensor's name,
dtype and shape (:class:`TensorSpec`), cut into shards. A shard is then a
safetensors file whose header goes first and whose tensors are streamed into
their places piece by piece (a run of rows at a time) as they are produced, so
no output tensor is ever held whole: a :class:`ShardFile`, the
:class:`cores.utils.safetensors_stream.StreamedFile` that the calibration dump
writes its files with too.

Everything goes to ``<out>.partial``; each shard is written under a temporary
name and renamed when complete, then recorded in ``deploy_progress.json``
together with the settings that produced it, its size and checksum, and the
verification of its tensors. Only a complete folder is renamed to ``<out>``, so a
folder under the final name is always complete. A rerun with the same settings
(and so the same plan) resumes: recorded shards that are still what was recorded
are kept and their tensors not produced again; a rerun with other settings, or
after a recorded shard changed, starts over. A rerun after the deploy completed
(or was killed inside its final rename) finds the output made from the same
inputs and settings and has nothing to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..formats.compressed_tensors import DEPLOY_REPORT as REPORT_NAME
from ..utils import safetensors_stream
from ..utils.checkpoint import INDEX_NAME
from ..utils.io import (atomic_write_text, changed_files, file_change, file_record, is_temp, load_json,
                        remove_stale_temps)
from ..utils.safetensors_stream import WRITE_PIECE_BYTES, TensorSpec  # noqa: F401 (re-exported)
from .verify import TensorCheck

log = logging.getLogger(__name__)

PROGRESS_NAME = "deploy_progress.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class DeployError(RuntimeError):
    """A deploy cannot start or finish: bad options, mismatched inputs, an existing output."""


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"500MiB"`` -> 500 * 2**20, ``1000`` -> 1000 (``transformers``' spelling).

    Raises:
        DeployError: On an unreadable size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not match or float(match.group(1)) <= 0:
        raise DeployError(f"--max_shard_size {text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def cut_into_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive runs of ``specs`` of at most ``max_bytes`` each (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    """``model-00001-of-0000N.safetensors`` ... as ``transformers`` names shards."""
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class PieceWriter(safetensors_stream.PieceWriter):
    """:class:`cores.utils.safetensors_stream.PieceWriter` of a deploy: a failed write is a :class:`DeployError`."""

    error, what = DeployError, "a shard"


class ShardFile(safetensors_stream.StreamedFile):
    """One shard: a :class:`cores.utils.safetensors_stream.StreamedFile` with ``{"format": "pt"}`` metadata, whose
    pieces that do not fit the plan, incomplete tensors and failed read-back are :class:`DeployError`.

    Tensors are laid out by decreasing element size (plan order within a size), so
    every one starts at a multiple of its element size.

    Args:
        path: The final file name; data goes to a hidden temporary name until :meth:`close`.
        specs: The tensors, in the order they will be written.
        writer: Who writes the pieces (a background one is shared by the shards of a
            deploy); None: they are written in :meth:`write`.
    """

    error = DeployError

    def __init__(self, path: Path, specs: list[TensorSpec], writer: PieceWriter | None = None):
        super().__init__(path, specs, {"format": "pt"}, PieceWriter() if writer is None else writer)


class StagedOutput:
    """The ``<out>.partial`` folder of one deploy, with its progress record.

    Args:
        out: The final folder.
        identity: What the deploy is made from and how (JSON-ready); a staged
            folder of another identity is discarded.
        overwrite: Replace an existing ``out`` at commit.

    Attributes:
        committed: ``out`` already is this deploy (same identity), complete: there
            is nothing to write; :meth:`finish_commit` tidies what a kill inside
            :meth:`commit` left.

    Raises:
        DeployError: When ``out`` exists (made otherwise) without ``overwrite``, or
            the staging folder exists but was not made by a deploy.
    """

    def __init__(self, out: str | Path, identity: dict, overwrite: bool):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.identity = json.loads(json.dumps(identity))
        self.committed = False
        if self.out.exists() and not overwrite:
            if self._made_here():
                self.committed = True
                return
            raise DeployError(f"{self.out} exists; pass --overwrite to replace it, or choose another output path")
        self.progress = {"identity": self.identity, "shards": []}
        progress_path = self.partial / PROGRESS_NAME
        if progress_path.is_file():
            old = load_json(progress_path, DeployError, f"Delete {self.partial} and deploy again.")
            if old.get("identity") == self.identity:
                self.progress = old
                log.info("resuming %s: %d shard(s) written before", self.partial, len(old["shards"]))
            else:
                log.warning("%s was staged with other inputs or settings: starting over", self.partial)
                self.discard()
        elif self.partial.exists() and any(not is_temp(p) for p in self.partial.iterdir()):
            raise DeployError(f"{self.partial} exists but was not made by deploy.py; move or delete it")
        self.partial.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temps(self.partial):
            log.info("removed %s, left by an interrupted deploy", stale.name)
        self._save_progress()  # from now on the staging folder says whose it is

    def _made_here(self) -> bool:
        """Whether the existing ``out`` is a complete deploy of this identity whose files are as its report
        records them (a kill inside :meth:`commit` may have left the progress record in it)."""
        try:
            report = json.loads((self.out / REPORT_NAME).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(report, dict) or report.get("identity") != self.identity or "files" not in report:
            return False
        return next(changed_files(self.out, report["files"]), None) is None

    def finish_commit(self) -> None:
        """Remove what a kill inside :meth:`commit` may have left: the progress record, the replaced folder."""
        (self.out / PROGRESS_NAME).unlink(missing_ok=True)
        old = self.out.with_name(self.out.name + ".deploy-old")
        if old.exists():
            shutil.rmtree(old)

    def _save_progress(self) -> None:
        atomic_write_text(self.partial / PROGRESS_NAME, json.dumps(self.progress) + "\n")

    def discard(self) -> None:
        """Forget every recorded shard and start from an empty staging folder."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.progress = {"identity": self.identity, "shards": []}
        self._save_progress()

    @property
    def shards(self) -> dict[str, dict]:
        """Recorded shards: file name -> ``{"keys", "bytes", "checks"}``."""
        return {s["file"]: s for s in self.progress["shards"]}

    @property
    def shard_files(self) -> list[str]:
        return [s["file"] for s in self.progress["shards"]]

    def record_shard(self, name: str, specs: list[TensorSpec], checks: list[TensorCheck]) -> None:
        """Record a shard (already in the folder under ``name``) with its size and checksum and the checks of
        its tensors."""
        self.progress["shards"].append({"file": name, "keys": [s.name for s in specs],
                                        "bytes": sum(s.nbytes for s in specs),
                                        "record": file_record(self.partial / name),
                                        "checks": [asdict(c) for c in checks]})
        self._save_progress()

    def changed_shards(self) -> list[str]:
        """Recorded shards that are missing or no longer what was recorded (each with how)."""
        out = []
        for shard in self.progress["shards"]:
            path = self.partial / shard["file"]
            if "record" in shard:
                change = file_change(path, shard["record"])
            else:  # recorded by an older deploy.py: only its presence can be checked
                change = None if path.is_file() else "is missing"
            if change:
                out.append(f"{shard['file']} {change}")
        return out

    def file_records(self) -> dict[str, dict]:
        """Size and checksum of every file in the staged folder but the report and the progress record
        (shards from their records, the rest hashed now)."""
        shards = {s["file"]: s["record"] for s in self.progress["shards"] if "record" in s}
        return {p.name: shards.get(p.name) or file_record(p) for p in sorted(self.partial.iterdir())
                if p.is_file() and not is_temp(p) and p.name not in (PROGRESS_NAME, REPORT_NAME)}

    def checks(self) -> list[TensorCheck]:
        """The checks of every recorded shard, in shard order."""
        return [TensorCheck(**c) for s in self.progress["shards"] for c in s["checks"]]

    def copy_side_files(self, source: Path) -> None:
        """Copy tokenizer, generation config, chat template, remote code ... (every top-level file
        of ``source`` except weights, the index and ``config.json``)."""
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in ("config.json", INDEX_NAME, PROGRESS_NAME, REPORT_NAME) \
                    and not path.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(path, self.partial / path.name)

    def write_index(self) -> dict[str, str]:
        """Write the index of the recorded shards; returns its weight map."""
        weight_map = {k: s["file"] for s in self.progress["shards"] for k in s["keys"]}
        total = sum(s["bytes"] for s in self.progress["shards"])  # tensor bytes, as transformers counts
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(self.partial / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return weight_map

    def commit(self) -> Path:
        """Rename the staged folder to its final name (an existing one is replaced), drop the progress record.

        A crash inside leaves either the staged folder (a rerun commits it) or the
        complete final one.
        """
        umask = os.umask(0)
        os.umask(umask)
        for path in self.partial.iterdir():  # temp-file writes are private (0600); a served model is read by others
            path.chmod(0o666 & ~umask)
        old = self.out.with_name(self.out.name + ".deploy-old")
        if self.out.exists():
            if old.exists():
                shutil.rmtree(old)
            self.out.replace(old)
        self.partial.replace(self.out)
        (self.out / PROGRESS_NAME).unlink(missing_ok=True)
        if old.exists():
            shutil.rmtree(old)
        return self.out


class ShardedWriter:
    """Streams planned tensors into their shards, in plan order.

    Pieces of the tensors of each shard are handed to a :class:`PieceWriter` as
    they arrive; once its last tensor is complete, a shard is closed, renamed and
    recorded by that writer after its writes, while the caller goes on with the
    next one. Tensors of shards recorded by an earlier run are skipped
    (:meth:`wanted` says which ones to produce at all).
    Use it as a context manager: leaving it finishes the jobs in flight (complete
    shards are recorded) and a shard left unfinished keeps its temporary name.

    The writer runs on a thread of its own only when torch computes on one thread.
    An OpenMP team of several keeps its threads spinning on the other cores between
    kernels, and a writer thread competing with them made deploys slower than
    writing in the caller (W4 on 2 cores, timed as ``bench/bench_deploy.py`` does:
    ratio 0.46 against 0.53), while on one torch thread the writer thread is the
    faster (0.44 against 0.41).

    Args:
        staged: The staged folder; recorded shards that do not match the plan
            make it start over.
        shards: ``(file name, tensors)`` of every shard, in order.
    """

    def __init__(self, staged: StagedOutput, shards: list[tuple[str, list[TensorSpec]]]):
        self.staged, self.shards = staged, shards
        self.where = {spec.name: i for i, (_, specs) in enumerate(shards) for spec in specs}
        planned = {name: [s.name for s in specs] for name, specs in shards}
        if any(planned.get(f) != s["keys"] for f, s in staged.shards.items()):
            log.warning("%s holds shards of another layout: starting over", staged.partial)
            staged.discard()
        elif changed := staged.changed_shards():
            log.warning("%s: %s since it was recorded: starting over", staged.partial, "; ".join(changed))
            staged.discard()
        self.done = {i for i, (name, _) in enumerate(shards) if name in staged.shards}
        self.current: tuple[int, ShardFile] | None = None
        self.checks: dict[str, TensorCheck] = {}
        self.pieces = PieceWriter(background=torch.get_num_threads() == 1)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish the jobs in flight and stop the background writer; an unfinished shard stays a temporary file."""
        self.pieces.close()
        if self.current is not None:
            self.current[1].abandon()
            self.current = None

    def wanted(self, name: str) -> bool:
        """Whether tensor ``name`` still has to be written."""
        return self.where[name] not in self.done

    def add_check(self, name: str, check: TensorCheck) -> None:
        """Record ``check`` with the shard of tensor ``name``; call it before that tensor's last piece."""
        if self.wanted(name):
            self.checks[name] = check

    def write(self, name: str, piece: Tensor) -> None:
        """Append ``piece`` (the whole tensor, or its next run of rows) to tensor ``name``; it may be
        overwritten as soon as this returns.

        Raises:
            DeployError: When tensors arrive out of plan order or do not match it,
                or an earlier write or shard failed.
        """
        index = self.where.get(name)
        if index is None:
            raise DeployError(f"{name} is not in the planned layout")
        if index in self.done:
            return
        if self.current is None or self.current[0] != index:
            if self.current is not None:
                raise DeployError(f"{name} arrived before {self.shards[self.current[0]][0]} was complete")
            self.current = index, ShardFile(self.staged.partial / self.shards[index][0], self.shards[index][1],
                                            self.pieces)
        shard = self.current[1]
        if shard.write(name, piece) and shard.complete:
            self.current = None
            name_, specs = self.shards[index]
            checks = [self.checks.pop(s.name) for s in specs if s.name in self.checks]
            self.pieces.submit(lambda: (shard.close(), self.staged.record_shard(name_, specs, checks)))
            self.done.add(index)

    def finish(self) -> dict[str, str]:
        """Check that every shard is written, then write the index; returns its weight map.

        Raises:
            DeployError: Naming a shard some of whose tensors never arrived, or when a write failed.
        """
        self.pieces.flush()
        missing = [name for i, (name, _) in enumerate(self.shards) if i not in self.done]
        if missing:
            raise DeployError(f"shards {missing} were not completed")
        return self.staged.write_index()
