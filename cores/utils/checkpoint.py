"""Lazy, block-at-a-time access to a Hugging Face safetensors checkpoint.

Only the tensors asked for are read, each shard is opened for the duration of one
read (so memory-mapped pages are released again), and FP8 weights stored with a
``weight_scale_inv`` per 128x128 block (the DeepSeek / Qwen FP8 layout) are
dequantized to bf16 on load.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SCALE_INV_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing files, corrupt, or does not match its config."""


def dequantize_fp8_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK
) -> torch.Tensor:
    """Dequantize an FP8 weight with one inverse scale per ``block`` tile.

    Args:
        weight: ``[out, in]`` tensor in ``float8_e4m3fn``.
        scale_inv: ``[ceil(out / b0), ceil(in / b1)]`` multipliers.
        block: tile shape ``(b0, b1)``.

    Returns:
        The ``bf16`` weight ``weight * scale_inv`` broadcast over each tile.
    """
    out_dim, in_dim = weight.shape
    b0, b1 = block
    expected = (-(-out_dim // b0), -(-in_dim // b1))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
            f"with {b0}x{b1} blocks (expected {expected})"
        )
    scale = scale_inv.float().repeat_interleave(b0, 0)[:out_dim].repeat_interleave(b1, 1)[:, :in_dim]
    return (weight.float() * scale).to(torch.bfloat16)


def _fp8_block(config: dict) -> tuple[int, int]:
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") == "fp8" and qcfg.get("weight_block_size"):
        b0, b1 = qcfg["weight_block_size"]
        return int(b0), int(b1)
    return DEFAULT_FP8_BLOCK


class CheckpointReader:
    """Reads selected tensors of a safetensors checkpoint folder.

    Args:
        model_dir: folder with ``config.json`` and one ``*.safetensors`` file, or
            several shards with ``model.safetensors.index.json``.

    Raises:
        CheckpointError: when the folder, its config, its index or a shard named by
            the index is missing, or a shard cannot be parsed.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model folder {self.model_dir} does not exist")
        config_path = self.model_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path} is missing: not a Hugging Face model folder")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
        self.fp8_block = _fp8_block(self.config)
        self.weight_map = self._build_weight_map()

    def _build_weight_map(self) -> dict[str, str]:
        index_path = self.model_dir / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{index_path} is not a valid safetensors index: {err}") from err
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{index_path} names shard(s) that are not in {self.model_dir}: {', '.join(missing)}. "
                    "The download is incomplete: fetch the missing shard(s)."
                )
            return dict(weight_map)
        shards = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"no *.safetensors file in {self.model_dir}")
        if len(shards) > 1:
            raise CheckpointError(
                f"{self.model_dir} has {len(shards)} safetensors files but no {INDEX_NAME}; "
                "restore the index file that came with the checkpoint"
            )
        with self._open(shards[0]) as f:
            return {key: shards[0] for key in f.keys()}

    def _open(self, filename: str):
        path = self.model_dir / filename
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f"cannot read {path}: {err}. The file is truncated or corrupt: download it again."
            ) from err

    @property
    def keys(self) -> list[str]:
        """All tensor names stored in the checkpoint (FP8 scale tensors included)."""
        return list(self.weight_map)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Names of the stored tensors that start with ``prefix``, scale tensors excluded."""
        return [k for k in self.weight_map if k.startswith(prefix) and not k.endswith(SCALE_INV_SUFFIX)]

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read tensors by full name, dequantizing FP8 weights to bf16.

        Args:
            keys: tensor names; ``*_scale_inv`` companions are read automatically.

        Returns:
            name -> tensor, on CPU, in the stored dtype (bf16 for FP8 weights).
        """
        keys = list(keys)
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            if key not in self.weight_map:
                where = INDEX_NAME if (self.model_dir / INDEX_NAME).is_file() else "the safetensors file"
                raise CheckpointError(f"tensor {key!r} is not in {self.model_dir} ({where} does not list it)")
            by_file[self.weight_map[key]].append(key)
            scale_key = key + SCALE_INV_SUFFIX
            if scale_key in self.weight_map:
                by_file[self.weight_map[scale_key]].append(scale_key)
        raw: dict[str, torch.Tensor] = {}
        for filename, names in by_file.items():
            with self._open(filename) as f:
                for name in names:
                    try:
                        raw[name] = f.get_tensor(name)
                    except Exception as err:
                        raise CheckpointError(
                            f"cannot read tensor {name!r} from {self.model_dir / filename}: {err}. "
                            "The file is truncated or corrupt: download it again."
                        ) from err
        out = {}
        for key in keys:
            tensor = raw[key]
            scale = raw.get(key + SCALE_INV_SUFFIX)
            if tensor.dtype == torch.float8_e4m3fn:
                if scale is None:
                    raise CheckpointError(
                        f"FP8 tensor {key!r} in {self.model_dir} has no {key + SCALE_INV_SUFFIX!r} to dequantize it"
                    )
                tensor = dequantize_fp8_blockwise(tensor, scale, self.fp8_block)
            out[key] = tensor
        return out

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Read every tensor under ``prefix``; returned names have the prefix removed."""
        keys = self.keys_with_prefix(prefix)
        if not keys:
            raise CheckpointError(f"no tensor named {prefix}* in {self.model_dir}")
        return {k[len(prefix):]: v for k, v in self.read(keys).items()}


# config fields that change between a checkpoint and its FP8 / BF16 / quantized twins
_NON_ARCH_KEYS = {"quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                  "architectures", "use_cache", "compression_config"}


def model_fingerprint(reader: CheckpointReader) -> str:
    """A short hash that identifies a model independently of its storage precision.

    Combines the architecture fields of ``config.json`` with the bytes of the first
    rows of the token embedding (kept in bf16 by FP8 checkpoints too), so a dump or
    param dir made from one model is told apart from another model of the same
    architecture, but an FP8 checkpoint and its BF16 dequantization match.
    """
    arch = {k: v for k, v in reader.config.items() if k not in _NON_ARCH_KEYS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    embed_keys = [k for k in reader.keys if k.endswith("embed_tokens.weight")]
    if embed_keys:
        with reader._open(reader.weight_map[embed_keys[0]]) as f:
            rows = f.get_slice(embed_keys[0])[:16]
        digest.update(rows.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
