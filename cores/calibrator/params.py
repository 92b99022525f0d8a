"""The param dir: learned quantization parameters, one file and one record per block and mode.

A block is trained whole (train mode ``block``) or as two sub-blocks that may run
as separate jobs into the same dir: ``mla`` (the attention sub-block and its KV
cache quantizer) and ``moe`` (the MLP sub-block: routed experts, shared experts,
or a dense MLP). Files, all written through a temporary name:

- ``run.json``: what the params were made from (model, dump, weight and activation
  settings, ignore list); every job must agree with it;
- ``run_<mode>.json``: that mode's scheme and options (the KV cache belongs to
  the mode that owns the attention: ``block`` or ``mla``; ``moe`` has none);
- ``<mode>_{i:03d}.safetensors`` and ``<mode>_{i:03d}.json``: block ``i``'s
  quantizer tensors and record; the record is written last and marks it done. It
  holds the size and checksum of the tensors file (``params_file``), checked
  whenever the params are loaded, so a changed or truncated file is refused.
  Jobs that finish the same block at once serialise on ``.params.lock``: the
  first one's pair of files stays, the later ones keep it.

A run with different values is refused instead of mixed in. Evaluation and
deploy read one or several dirs as a :class:`ParamSet` (the seed's separate
``--mla_param_path`` / ``--moe_param_path``): block ``i`` is complete when one of
them has its ``block`` params, or its ``mla`` and its ``moe`` params.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch
from torch import Tensor, nn

from ..quantization import QuantScheme, SchemeOverride, TargetSchemes
from ..quantization.block import freeze, load_quant_state, quantize_block
from ..utils.io import atomic_write_text, file_change, file_record, load_json, locked, temp_path

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".params.lock"
TRAIN_MODES = ("block", "mla", "moe")
SUB_BLOCK_MODES = ("mla", "moe")
"""Modes that each cover part of a block; together they cover all of it."""
MODE_KEYS = ("train_mode", "scheme", "rtn", "sequential")
"""Identity fields that belong to one mode; the others are shared by every mode of a dir."""
SCHEME_SHARED = ("w_bits", "w_granularity", "group_size", "a_bits", "act_mode", "act_format")
"""Scheme fields every mode of a dir must share (the KV cache is the attention's own)."""


class ParamDirError(RuntimeError):
    """A param dir is missing, incomplete, or belongs to another run."""


def split_identity(identity: dict) -> tuple[str, dict, dict]:
    """``(mode, shared, mode_identity)`` of a run's full identity.

    ``moe`` owns no attention, so its scheme is recorded without a KV cache.
    """
    mode = identity.get("train_mode", "block")
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode {mode!r}: choose one of {', '.join(TRAIN_MODES)}")
    shared = {k: v for k, v in identity.items() if k not in MODE_KEYS}
    shared["weights"] = {k: identity["scheme"][k] for k in SCHEME_SHARED}
    own = {k: identity[k] for k in MODE_KEYS if k in identity}
    if mode == "moe":
        own["scheme"] = {**own["scheme"], "kv_bits": None, "kv_format": None}
    return mode, shared, own


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class ParamDir:
    """Read and write one param dir.

    Args:
        path: the folder (created on the first write).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._unchecked_warned = False

    def params_path(self, idx: int, mode: str = "block") -> Path:
        return self.path / f"{mode}_{idx:03d}.safetensors"

    def record_path(self, idx: int, mode: str = "block") -> Path:
        return self.path / f"{mode}_{idx:03d}.json"

    def _json(self, path: Path) -> dict:
        return load_json(path, ParamDirError, f"Delete {path.name} (and the blocks it describes) and rerun main.py.")

    def shared_identity(self) -> dict:
        run = self.path / RUN_FILE
        if not run.is_file():
            raise ParamDirError(f"{run} is missing: {self.path} is not a param dir written by main.py")
        return self._json(run)

    def mode_identities(self) -> dict[str, dict]:
        """``mode -> its identity`` for every mode that has written here."""
        return {m: self._json(p) for m in TRAIN_MODES if (p := self.path / f"run_{m}.json").is_file()}

    def bind(self, identity: dict) -> None:
        """Create the dir for a run's ``identity``, or check that the dir already belongs to it.

        ``identity`` holds ``train_mode``, ``scheme``, ``rtn`` and ``sequential``
        beside the fields every mode shares. ``mla`` and ``moe`` runs may share a
        dir (their weight and activation settings must agree); ``block`` and the
        sub-block modes may not. Both files are written atomically and idempotently,
        so concurrent jobs of any mode can bind at once.

        Raises:
            ParamDirError: naming each differing field.
        """
        mode, shared, own = split_identity(identity)
        again = "Use another --output_dir, or delete that folder to start over."
        others = self.mode_identities()
        clash = [m for m in others if (m == "block") != (mode == "block")]
        if clash:  # first: the modes' defaults differ too (smoothing is block-only), this says why
            raise ParamDirError(f"{self.path} holds train_mode {clash[0]} params; train_mode {mode} cannot be mixed "
                                f"with them (block trains the attention and the MLP jointly). {again}")
        if (self.path / RUN_FILE).is_file():
            diff = _differences(self.shared_identity(), shared)
            if diff:
                raise ParamDirError(f"{self.path} holds params of another run ({'; '.join(diff)}). {again}")
        if mode in others:
            diff = _differences(others[mode], own)
            if diff:
                raise ParamDirError(f"{self.path} holds {mode} params of another run ({'; '.join(diff)}). {again}")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / RUN_FILE).is_file():
            atomic_write_text(self.path / RUN_FILE, json.dumps(shared, indent=2, sort_keys=True) + "\n")
        atomic_write_text(self.path / f"run_{mode}.json", json.dumps(own, indent=2, sort_keys=True) + "\n")

    def is_done(self, idx: int, mode: str = "block") -> bool:
        return self.record_path(idx, mode).is_file()

    def done_blocks(self, mode: str = "block") -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.path.glob(f"{mode}_[0-9]*.json"))

    def save_block(self, idx: int, state: dict[str, Tensor], record: dict, mode: str = "block") -> bool:
        """Write block ``idx``'s tensors, then its record (with the tensors file's size and checksum).

        Returns:
            False when another job finished the block meanwhile: its files are kept.
        """
        path = self.params_path(idx, mode)
        tmp = temp_path(path)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            record = {**record, "params_file": file_record(tmp)}
            with locked(self.path / LOCK_FILE):
                if self.is_done(idx, mode):
                    log.info("block %d %s was finished by another job meanwhile: keeping its params", idx, mode)
                    return False
                tmp.replace(path)
                atomic_write_text(self.record_path(idx, mode), json.dumps(record, indent=2) + "\n")
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def load_block(self, idx: int, mode: str = "block") -> dict[str, Tensor]:
        """Block ``idx``'s tensors, checked against the size and checksum in its record.

        Raises:
            ParamDirError: when the block is not done, or its file changed or does not read.
        """
        path, record_path = self.params_path(idx, mode), self.record_path(idx, mode)
        if not self.is_done(idx, mode) or not path.is_file():
            raise ParamDirError(f"block {idx} has no {mode} params in {self.path}: run main.py for it first")
        redo = f"delete it and {record_path.name}, then rerun main.py for that block"
        recorded = self._json(record_path).get("params_file")
        if recorded is None:
            if not self._unchecked_warned:
                log.warning("%s: block records without params_file (written by an older main.py): the params "
                            "files are not checked", self.path)
                self._unchecked_warned = True
        elif change := file_change(path, recorded):
            raise ParamDirError(f"{path} {change}, as {record_path.name} records it: {redo}")
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ParamDirError(f"cannot read {path}: {err}; {redo}") from err

    def records(self, mode: str | None = None) -> list[dict]:
        """Block records of ``mode`` (default: every mode present), in block order."""
        modes = [mode] if mode else list(self.mode_identities()) or ["block"]
        return [self._json(self.record_path(i, m)) for m in modes for i in self.done_blocks(m)]

    def files(self) -> list[Path]:
        """Every params and record file, sorted."""
        return sorted(p for m in TRAIN_MODES for p in self.path.glob(f"{m}_[0-9]*"))

    # the read side, as one ParamSet of this dir
    def identity(self) -> dict:
        return ParamSet([self]).identity()

    def scheme(self) -> QuantScheme:
        return ParamSet([self]).scheme()

    def check_model(self, fingerprint: str) -> None:
        ParamSet([self]).check_model(fingerprint)

    def block_transform(self, num_blocks: int, frozen: bool = True, block_prefix=None):
        return ParamSet([self]).block_transform(num_blocks, frozen, block_prefix)


class ParamSet:
    """One or several param dirs of one model read as a whole (e.g. the ``mla`` and the ``moe`` dir).

    Args:
        dirs: the dirs; each mode may come from one of them only.

    Raises:
        ParamDirError: when the dirs disagree on the model, dump or weight settings,
            or two of them hold the same mode.
    """

    def __init__(self, dirs: Sequence[ParamDir | str | Path]):
        self.dirs = [d if isinstance(d, ParamDir) else ParamDir(d) for d in dirs]
        if not self.dirs:
            raise ValueError("ParamSet needs at least one param dir")
        self.shared = self.dirs[0].shared_identity()
        self.modes: dict[str, tuple[ParamDir, dict]] = {}
        for d in self.dirs:
            for mode, own in d.mode_identities().items():
                if mode in self.modes:
                    raise ParamDirError(f"{self.modes[mode][0].path} and {d.path} both hold {mode} params; "
                                        "pass one of them")
                self.modes[mode] = (d, own)
        if "block" in self.modes and set(self.modes) & set(SUB_BLOCK_MODES):
            raise ParamDirError(f"{', '.join(str(d.path) for d in self.dirs)} mix block params with mla/moe params")
        for d in self.dirs:
            diff = _differences(self.shared, d.shared_identity())
            if diff:
                raise ParamDirError(f"{d.path} and {self.dirs[0].path} are params of different runs "
                                    f"({'; '.join(diff)}); they cannot be combined")
        if not self.modes:
            raise ParamDirError(f"{self.dirs[0].path} has no run_<mode>.json: no run of main.py has bound it")

    @property
    def paths(self) -> list[Path]:
        return [d.path for d in self.dirs]

    def identity(self) -> dict:
        """The shared identity with the effective ``scheme`` (KV cache from ``block`` or ``mla``) and ``modes``."""
        owner = self.modes.get("block") or self.modes.get("mla") or self.modes["moe"]
        return {**self.shared, "scheme": owner[1]["scheme"], "modes": {m: own for m, (_, own) in self.modes.items()}}

    def scheme(self) -> QuantScheme:
        return QuantScheme(**self.identity()["scheme"])

    def target_schemes(self) -> TargetSchemes | None:
        """The scheme with the run's per-target overrides (None: the run had none)."""
        overrides = self.identity().get("overrides")
        if not overrides:
            return None
        return TargetSchemes(self.scheme(), tuple(SchemeOverride.from_dict(o) for o in overrides))

    def files(self) -> list[Path]:
        return [p for d in self.dirs for p in d.files()]

    def check_model(self, fingerprint: str) -> None:
        theirs = self.shared.get("model_fingerprint")
        if theirs != fingerprint:
            raise ParamDirError(
                f"{self.dirs[0].path} was trained on another model (fingerprint {theirs}, this model {fingerprint})"
            )

    def missing(self, num_blocks: int) -> dict[str, list[int]]:
        """``mode -> blocks without params`` for what the eval of all ``num_blocks`` still needs."""
        needed = ("block",) if "block" in self.modes else SUB_BLOCK_MODES
        out = {}
        for mode in needed:
            have = self.modes[mode][0] if mode in self.modes else None
            gaps = [i for i in range(num_blocks) if have is None or not have.is_done(i, mode)]
            if gaps:
                out[mode] = gaps
        return out

    def load_block(self, idx: int) -> dict[str, Tensor]:
        """Every quantizer tensor of block ``idx``, merged over the modes."""
        state: dict[str, Tensor] = {}
        for mode, (d, _) in self.modes.items():
            state.update(d.load_block(idx, mode))
        return state

    def block_transform(self, num_blocks: int, frozen: bool = True, block_prefix=None):
        """``(idx, block) -> quantized block`` with these params.

        Args:
            num_blocks: blocks the model has; every one must have params.
            frozen: freeze the block (weights quantized once, cached for its forward).
                Deploy passes False: it quantizes each weight once itself.
            block_prefix: ``idx -> "model.layers.{idx}."``, the full name ignore entries and overrides match
                under (the model's ``family.block_prefix``); None: the family of the params' ``model_type``.

        Raises:
            ParamDirError: when some block has no params yet.
        """
        missing = self.missing(num_blocks)
        if missing:
            where = ", ".join(str(p) for p in self.paths)
            gaps = "; ".join(f"{mode} params for blocks {_ranges(blocks)}" for mode, blocks in missing.items())
            raise ParamDirError(f"{where} has no {gaps}; run main.py for them")
        identity, scheme, targets = self.identity(), self.scheme(), self.target_schemes()
        if block_prefix is None:  # ignore entries and overrides match full names
            from ..models.registry import get_family

            block_prefix = get_family(identity["model_type"]).block_prefix

        def transform(idx: int, block: nn.Module) -> nn.Module:
            quantize_block(block, scheme, identity["ignore"], identity["lwc"], identity["lac"],
                           rounding=identity.get("rounding", False), smooth=identity.get("smooth", False),
                           smooth_dtype=smooth_dtype(identity) or torch.bfloat16, targets=targets,
                           prefix=block_prefix(idx))
            load_quant_state(block, self.load_block(idx), f"params of block {idx} in {', '.join(map(str, self.paths))}")
            return freeze(block) if frozen else block

        return transform


def smooth_dtype(identity: dict) -> torch.dtype | None:
    """The dtype of a run's smoothers (what its rewritten norm weights are stored in); None: no smoothing."""
    if not identity.get("smooth"):
        return None
    return getattr(torch, identity.get("smooth_dtype") or "bfloat16")


def open_params(param_dir: str | Path | None = None, mla_param_path: str | Path | None = None,
                moe_param_path: str | Path | None = None) -> ParamSet | None:
    """The params an eval or deploy was given: ``--param_dir`` and/or the seed's two paths (None: none)."""
    dirs = [p for p in (param_dir, mla_param_path, moe_param_path) if p is not None]
    unique = list(dict.fromkeys(str(Path(p).resolve()) for p in dirs))
    return ParamSet(unique) if unique else None


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)
