"""On-disk calibration dumps: hidden states at every block boundary.

``hidden_{i:03d}.safetensors`` holds the bf16 states entering block ``i``
(``[n_samples, seq_len, hidden]``, key ``hidden``); the last file is the input to
the final norm. Files are streamed to disk batch by batch under a temporary name
and renamed when complete, and read back in row slices, so neither side ever
holds a whole boundary in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.streaming import HiddenStore
from ..utils.io import atomic_write_text

MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


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
        atomic_write_text(Path(dump_dir) / MANIFEST, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, dump_dir: str | Path) -> DumpManifest:
        path = Path(dump_dir) / MANIFEST
        if not path.is_file():
            raise DumpError(f"{path} is missing: {dump_dir} is not a calibration dump (run extract_calib_data.py)")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def mismatch(self, other: DumpManifest) -> list[str]:
        """``field: ours != theirs`` for every differing field."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


def write_tensor_streaming(path: Path, store: HiddenStore, batch_rows: int, key: str = "hidden",
                           metadata: dict[str, str] | None = None) -> None:
    """Write ``store`` as a one-tensor safetensors file without materialising it.

    The header is written first, then the rows batch by batch; the file appears
    under its final name only when complete.
    """
    nbytes = store.shape[0] * store.row_bytes
    header = {key: {"dtype": _ST_DTYPES[store.dtype], "shape": list(store.shape), "data_offsets": [0, nbytes]}}
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for lo in range(0, len(store), batch_rows):
            f.write(store.read(lo, lo + batch_rows).contiguous().view(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
