"""The param dir: learned quantization parameters, one file and one record per block.

``run.json`` says what the params were made from (model, dump, scheme, options);
a run with different values is refused instead of mixed in. Block ``i`` is done
when ``block_{i:03d}.json`` exists; it is written after the params file, both
through a temporary name.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..quantization import QuantScheme
from ..utils.io import atomic_write_text
from .quant_block import freeze, load_quant_state, quantize_block

RUN_FILE = "run.json"


class ParamDirError(RuntimeError):
    """A param dir is missing, incomplete, or belongs to another run."""


class ParamDir:
    """Read and write one param dir.

    Args:
        path: the folder (created on the first write).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def params_path(self, idx: int) -> Path:
        return self.path / f"block_{idx:03d}.safetensors"

    def record_path(self, idx: int) -> Path:
        return self.path / f"block_{idx:03d}.json"

    def identity(self) -> dict:
        run = self.path / RUN_FILE
        if not run.is_file():
            raise ParamDirError(f"{run} is missing: {self.path} is not a param dir written by main.py")
        return json.loads(run.read_text())

    def bind(self, identity: dict) -> None:
        """Create the dir for ``identity``, or check that it already belongs to it.

        Raises:
            ParamDirError: naming each differing field.
        """
        if (self.path / RUN_FILE).is_file():
            old = self.identity()
            diff = [f"{k}: {old.get(k)!r} != {identity.get(k)!r}" for k in sorted(set(old) | set(identity))
                    if old.get(k) != identity.get(k)]
            if diff:
                raise ParamDirError(
                    f"{self.path} holds params of another run ({'; '.join(diff)}). "
                    "Use another --output_dir, or delete that folder to start over."
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / RUN_FILE, json.dumps(identity, indent=2, sort_keys=True) + "\n")

    def is_done(self, idx: int) -> bool:
        return self.record_path(idx).is_file()

    def done_blocks(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob("block_*.json"))

    def save_block(self, idx: int, state: dict[str, Tensor], record: dict) -> None:
        tmp = self.path / f".{self.params_path(idx).name}.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(self.params_path(idx))
        atomic_write_text(self.record_path(idx), json.dumps(record, indent=2) + "\n")

    def load_block(self, idx: int) -> dict[str, Tensor]:
        path = self.params_path(idx)
        if not self.is_done(idx) or not path.is_file():
            raise ParamDirError(f"block {idx} has no params in {self.path}: run main.py for it first")
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ParamDirError(f"cannot read {path}: {err}; delete it and {self.record_path(idx).name}, "
                                "then rerun main.py for that block") from err

    def records(self) -> list[dict]:
        return [json.loads(self.record_path(i).read_text()) for i in self.done_blocks()]

    def scheme(self) -> QuantScheme:
        return QuantScheme(**self.identity()["scheme"])

    def check_model(self, fingerprint: str) -> None:
        theirs = self.identity().get("model_fingerprint")
        if theirs != fingerprint:
            raise ParamDirError(
                f"{self.path} was trained on another model (fingerprint {theirs}, this model {fingerprint})"
            )

    def block_transform(self, num_blocks: int, frozen: bool = True):
        """``(idx, block) -> quantized block`` with this dir's params.

        Args:
            num_blocks: blocks the model has; every one must have params.
            frozen: freeze the block (weights quantized once, cached for its forward).
                Deploy passes False: it quantizes each weight once itself.

        Raises:
            ParamDirError: when some block has no params yet.
        """
        missing = [i for i in range(num_blocks) if not self.is_done(i)]
        if missing:
            raise ParamDirError(f"{self.path} has no params for blocks {_ranges(missing)}; run main.py for them")
        identity, scheme = self.identity(), self.scheme()

        def transform(idx: int, block: nn.Module) -> nn.Module:
            quantize_block(block, scheme, identity["ignore"], identity["lwc"], identity["lac"])
            load_quant_state(block, self.load_block(idx), str(self.params_path(idx)))
            return freeze(block) if frozen else block

        return transform


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)
