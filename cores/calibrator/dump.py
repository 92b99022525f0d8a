"""On-disk calibration dumps: hidden states at every block boundary.

``hidden_{i:03d}.safetensors`` holds the bf16 states entering block ``i``
(``[n_samples, seq_len, hidden]``, key ``hidden``); the last file is the input to
the final norm. Files are streamed to disk batch by batch under a temporary name
(by :mod:`cores.utils.safetensors_stream`, the writer of deploy's shards too) and
renamed when complete, and read back in row slices, so neither side ever
holds a whole boundary in memory.

``manifest.json`` holds the :class:`DumpManifest` and, under ``files``, the size
and checksum of every finished file (:func:`cores.utils.io.file_record`), recorded
before the file takes its final name: a file under a final name without a record,
or that differs from it, is refused where it is reused (a resumed dump, training).
Manifests of older versions have no ``files``; their files load unchecked, with a
warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.hidden_store import HiddenStore
from ..utils.io import atomic_write_text, file_change, file_record, load_json
from ..utils.safetensors_stream import StreamedFile, TensorSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = "files"
"""Key of the file records in the manifest."""
TOKENS = "tokens.safetensors"


class DumpError(RuntimeError):
    """A dump folder is missing, incomplete, or was made for another model or data."""


def boundary_path(dump_dir: str | Path, idx: int) -> Path:
    return Path(dump_dir) / f"hidden_{idx:03d}.safetensors"


@dataclass(frozen=True)
class DumpManifest:
    """What a dump was made from; a rerun with different values is refused."""

    model_fingerprint: str
    model_type: str
    num_blocks: int
    hidden_size: int
    dataset: str
    split: str
    n_samples: int
    seq_len: int
    seed: int
    dtype: str = "bfloat16"

    def save(self, dump_dir: str | Path) -> None:
        """Write the manifest, keeping the file records of one already there (the caller checked it is ours)."""
        path = Path(dump_dir) / MANIFEST
        files = _load(path).get(FILES, {}) if path.is_file() else {}
        atomic_write_text(path, json.dumps({**asdict(self), FILES: files}, indent=2) + "\n")

    @classmethod
    def load(cls, dump_dir: str | Path) -> DumpManifest:
        path = Path(dump_dir) / MANIFEST
        if not path.is_file():
            raise DumpError(f"{path} is missing: {dump_dir} is not a calibration dump (run extract_calib_data.py)")
        data = _load(path)
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise DumpError(f"{path} is not a dump manifest ({err}); rerun extract_calib_data.py into a new "
                            "folder") from None

    def mismatch(self, other: DumpManifest) -> list[str]:
        """``field: ours != theirs`` for every differing field."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def _load(path: Path) -> dict:
    return load_json(path, DumpError, "Delete the dump folder and rerun extract_calib_data.py.")


class DumpFiles:
    """The file records of a dump's manifest: what each finished file was when it was written.

    Args:
        dump_dir: the dump folder (its manifest must exist).
    """

    def __init__(self, dump_dir: str | Path):
        self.dump_dir = Path(dump_dir)
        self.manifest = self.dump_dir / MANIFEST
        self.records: dict[str, dict] | None = _load(self.manifest).get(FILES)
        self._checked: set[str] = set()
        if self.records is None:
            log.warning("%s records no file checksums (written by an older version): the dump's files are not "
                        "checked", self.manifest)

    def boundary(self, idx: int) -> HiddenDump:
        """Row-sliced reads of the input of block ``idx``, once it is checked against its record."""
        path = boundary_path(self.dump_dir, idx)
        self.check(path)
        return HiddenDump(path)

    def adopt(self, paths: list[Path]) -> None:
        """Record the files of an older dump that kept no records, unchecked (they are taken as they are)."""
        if paths:
            log.warning("recording the %d file(s) of %s as they are", len(paths), self.dump_dir)
        for path in paths:
            self.record(path.name, path)

    def record(self, name: str, written: Path) -> None:
        """Record ``written`` (complete, still under its temporary name) as the dump's file ``name``."""
        data = _load(self.manifest)
        data.setdefault(FILES, {})[name] = file_record(written)
        atomic_write_text(self.manifest, json.dumps(data, indent=2) + "\n")
        self.records = data[FILES]
        self._checked.discard(name)

    def check(self, path: str | Path) -> None:
        """Refuse the dump file ``path`` if it is not the file its record describes (once per file).

        Raises:
            DumpError: naming the file, how it differs, and what to do.
        """
        path = Path(path)
        if self.records is None or path.name in self._checked or not path.is_file():
            return
        record = self.records.get(path.name)
        change = f"is not recorded in {MANIFEST}" if record is None else file_change(path, record)
        if change:
            redo = ("delete it and the hidden_*.safetensors after it" if path.name.startswith("hidden_")
                    else "delete the dump folder")
            raise DumpError(f"{path} {change}: it is not the file this dump wrote ({MANIFEST} records the size and "
                            f"checksum of each file); {redo}, then rerun extract_calib_data.py")
        self._checked.add(path.name)


def write_tensor_streaming(path: Path, store: HiddenStore, batch_rows: int, key: str = "hidden",
                           metadata: dict[str, str] | None = None, files: DumpFiles | None = None) -> None:
    """Write ``store`` as a one-tensor safetensors file without materialising it.

    A :class:`cores.utils.safetensors_stream.StreamedFile` (``metadata`` after the
    tensor in its header): the header is written first, then the rows batch by
    batch; the file is flushed to disk and appears under its final name only when
    complete (and recorded in ``files``, when given, before that).
    """
    with StreamedFile(path, [TensorSpec(key, store.dtype, tuple(store.shape))], metadata,
                      metadata_last=True) as out:
        for lo in range(0, len(store), batch_rows):
            out.write(key, store.read(lo, lo + batch_rows))
        out.close(sync=True, before_rename=None if files is None else lambda tmp: files.record(path.name, tmp))


class HiddenDump:
    """Row-sliced reads of one boundary file."""

    def __init__(self, path: str | Path, key: str = "hidden"):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise DumpError(f"{self.path} is missing: the dump is incomplete (rerun extract_calib_data.py)")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.shape = tuple(f.get_slice(key).get_shape())
        except Exception as err:
            raise DumpError(f"cannot read {self.path}: {err}; delete it and rerun extract_calib_data.py") from err

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(self.key)[lo:hi]
