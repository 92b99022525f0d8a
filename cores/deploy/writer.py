"""A checkpoint folder written shard by shard, staged beside its destination.

Everything goes to ``<out>.partial``; each shard is written under a temporary
name and renamed, then recorded in ``deploy_progress.json`` together with the
settings that produced it. Only a complete folder is renamed to ``<out>``, so a
folder under the final name is always complete. A rerun with the same settings
resumes after the last recorded shard; a rerun with other settings starts over.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from ..utils.checkpoint import INDEX_NAME
from ..utils.io import atomic_write_text

log = logging.getLogger(__name__)

PROGRESS_NAME = "deploy_progress.json"
REPORT_NAME = "deploy_report.json"
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
        raise DeployError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class StagedOutput:
    """The ``<out>.partial`` folder of one deploy, with its progress record.

    Args:
        out: The final folder.
        identity: What the deploy is made from and how (JSON-ready); a staged
            folder of another identity is discarded.
        overwrite: Replace an existing ``out`` at commit.

    Raises:
        DeployError: When ``out`` exists without ``overwrite``, or the staging
            folder exists but was not made by a deploy.
    """

    def __init__(self, out: str | Path, identity: dict, overwrite: bool):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.identity = json.loads(json.dumps(identity))
        if self.out.exists() and not overwrite:
            raise DeployError(f"{self.out} exists; pass --overwrite to replace it, or choose another output path")
        self.progress = {"identity": self.identity, "shards": [], "units_done": 0}
        progress_path = self.partial / PROGRESS_NAME
        if progress_path.is_file():
            old = json.loads(progress_path.read_text())
            if old.get("identity") == self.identity:
                self.progress = old
                log.info("resuming %s: %d shard(s) written before", self.partial, len(old["shards"]))
            else:
                log.warning("%s was staged with other inputs or settings: starting over", self.partial)
                shutil.rmtree(self.partial)
        elif self.partial.exists() and any(self.partial.iterdir()):
            raise DeployError(f"{self.partial} exists but was not made by deploy.py; move or delete it")
        self.partial.mkdir(parents=True, exist_ok=True)
        self.done_keys = {k for shard in self.progress["shards"] for k in shard["keys"]}

    @property
    def units_done(self) -> int:
        """Leading units whose tensors are all in recorded shards."""
        return self.progress["units_done"]

    @property
    def shard_files(self) -> list[str]:
        return [s["file"] for s in self.progress["shards"]]

    def write_shard(self, name: str, tensors: dict[str, Tensor], units_done: int) -> None:
        """Write one shard atomically and record it.

        Args:
            name: File name inside the folder.
            tensors: Its tensors.
            units_done: Leading units complete once this shard is written.
        """
        tmp = self.partial / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(self.partial / name)
        self.progress["shards"].append({"file": name, "keys": list(tensors),
                                        "bytes": sum(tensor_bytes(t) for t in tensors.values())})
        self.progress["units_done"] = units_done
        self.done_keys.update(tensors)
        atomic_write_text(self.partial / PROGRESS_NAME, json.dumps(self.progress) + "\n")

    def copy_side_files(self, source: Path) -> None:
        """Copy tokenizer, generation config, chat template, remote code ... (every top-level file
        of ``source`` except weights, the index and ``config.json``)."""
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in ("config.json", INDEX_NAME, PROGRESS_NAME, REPORT_NAME) \
                    and not path.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(path, self.partial / path.name)

    def write_index(self, renames: dict[str, str] | None = None) -> dict[str, str]:
        """Rename shards (``renames``: staged -> final name) and write the index.

        Safe to repeat after a crash: a shard already renamed is left alone.

        Returns:
            The index's weight map.
        """
        renames = renames or {}
        for old, new in renames.items():
            if (self.partial / old).exists():
                (self.partial / old).replace(self.partial / new)
        weight_map = {}
        for shard in self.progress["shards"]:
            weight_map.update(dict.fromkeys(shard["keys"], renames.get(shard["file"], shard["file"])))
        total = sum(shard["bytes"] for shard in self.progress["shards"])  # tensor bytes, as transformers counts
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


class ShardWriter:
    """Collects tensors into shards of at most ``max_bytes`` and writes each as it fills.

    Tensors are added unit by unit (a unit is a block or one tensor outside the
    blocks); tensors already in recorded shards are skipped, so a resumed run
    rebuilds only what is missing. A tensor larger than ``max_bytes`` gets a shard
    of its own. Shards are staged as ``model-00001.safetensors`` ... and renamed
    to ``model-00001-of-0000N.safetensors`` by :meth:`finish`.

    Args:
        staged: The staged folder.
        max_bytes: Shard size limit.
    """

    def __init__(self, staged: StagedOutput, max_bytes: int):
        self.staged, self.max_bytes = staged, max_bytes
        self.buffer: dict[str, Tensor] = {}
        self.size = 0

    def add(self, unit: int, tensors: dict[str, Tensor]) -> None:
        """Add the tensors of ``unit`` (units come in increasing order)."""
        for key, tensor in tensors.items():
            if key in self.staged.done_keys:
                continue
            nbytes = tensor_bytes(tensor)
            if self.buffer and self.size + nbytes > self.max_bytes:
                self._flush(unit)
            self.buffer[key] = tensor
            self.size += nbytes

    def _flush(self, units_done: int) -> None:
        self.staged.write_shard(f"model-{len(self.staged.shard_files) + 1:05d}.safetensors", self.buffer, units_done)
        self.buffer, self.size = {}, 0

    def finish(self, units: int) -> dict[str, str]:
        """Write the last shard, give every shard its final name, write the index.

        Args:
            units: The total number of units.

        Returns:
            The index's weight map.
        """
        if self.buffer:
            self._flush(units)
        files = self.staged.shard_files
        return self.staged.write_index({f: f"{f[:-12]}-of-{len(files):05d}.safetensors" for f in files})
