"""Lazy, block-at-a-time access to a Hugging Face safetensors checkpoint.

Only the tensors asked for are read, each shard is opened for the duration of one
read (so memory-mapped pages are released again), and FP8 weights stored with a
``weight_scale_inv`` per 128x128 block (the DeepSeek / Qwen FP8 layout) are
dequantized to bf16 on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..quantization.fp8_block import e4m3_to_float, scale_tiles_
from ..quantization.primitives import FP8_E4M3_MAX, Workspace

INDEX_NAME = "model.safetensors.index.json"
SCALE_INV_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing files, corrupt, or does not match its config."""


FP8_CHUNK_ELEMENTS = 1 << 20
"""About how many values :func:`iter_dequantize_fp8` converts at a time (its fp32 buffer stays in cache)."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype names -> torch dtypes."""


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file: ``name -> {dtype, shape, data_offsets}`` (and ``__metadata__``).

    Raises:
        CheckpointError: When the header is not valid JSON, or the file is shorter or
            longer than its header says (truncated, or joined to something).
    """
    corrupt = "The file is truncated or corrupt: download it again."
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            (size,) = struct.unpack("<Q", f.read(8))
            if size > file_size - 8:
                raise ValueError(f"its header would be {size} bytes long, but the file has {file_size}")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise CheckpointError(f"cannot read the header of {path}: {err}. {corrupt}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"the header of {path} is not a JSON object. {corrupt}")
    try:
        data_bytes = max((int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as err:
        raise CheckpointError(f"the header of {path} has no valid data_offsets ({err!r}). {corrupt}") from None
    if 8 + size + data_bytes != file_size:
        raise CheckpointError(f"{path} has {file_size} bytes but its header describes {8 + size + data_bytes}. "
                              f"{corrupt}")
    return header


def _check_fp8_scale(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    out_dim, in_dim = weight.shape
    expected = (-(-out_dim // block[0]), -(-in_dim // block[1]))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
            f"with {block[0]}x{block[1]} blocks (expected {expected})"
        )


def fp8_e4m3_to_float(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``values.float()`` for ``float8_e4m3fn`` (as torch casts it, NaN included) into the fp32 ``out``:
    :func:`~cores.quantization.fp8_block.e4m3_to_float`, then the NaN codes, which it reads as +-480, made NaN."""
    e4m3_to_float(values, out)
    lo, hi = torch.aminmax(out) if out.numel() else (out.new_zeros(()), out.new_zeros(()))
    if lo < -FP8_E4M3_MAX or hi > FP8_E4M3_MAX:  # only the NaN codes (S.1111.111) read past 448, as 480
        out[out.abs() > FP8_E4M3_MAX] = float("nan")
    return out


def iter_dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_FP8_BLOCK,
    chunk_elements: int = FP8_CHUNK_ELEMENTS,
    workspace: Workspace | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """:func:`dequantize_fp8_blockwise` a few tile rows at a time.

    Each tile's scale is broadcast over it (:func:`~cores.quantization.fp8_block.scale_tiles_`, no
    full-size scale matrix); the buffers (from ``workspace``, fresh when None) are reused from chunk to chunk.

    Yields:
        ``(rows, bf16 values of those rows)``; the tensor is overwritten by the next chunk.
    """
    _check_fp8_scale(weight, scale_inv, block)
    out_dim, in_dim = weight.shape
    b0 = block[0]
    step = max(1, chunk_elements // (b0 * max(in_dim, 1))) * b0
    workspace = Workspace() if workspace is None else workspace
    x32 = workspace.get("fp8_values", (min(step, out_dim), in_dim), device=weight.device)
    out = workspace.get("fp8_bf16", x32.shape, torch.bfloat16, weight.device)
    for start in range(0, out_dim, step):
        n = min(step, out_dim - start)
        x = scale_tiles_(fp8_e4m3_to_float(weight[start:start + n], x32[:n]),
                         scale_inv[start // b0: (start + n + b0 - 1) // b0], block)
        yield slice(start, start + n), out[:n].copy_(x)


def dequantize_fp8_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_FP8_BLOCK,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Dequantize an FP8 weight with one inverse scale per ``block`` tile.

    Args:
        weight: ``[out, in]`` tensor in ``float8_e4m3fn``.
        scale_inv: ``[ceil(out / b0), ceil(in / b1)]`` multipliers.
        block: tile shape ``(b0, b1)``.
        workspace: where the conversion's buffers come from (fresh ones when None).

    Returns:
        The ``bf16`` weight ``weight * scale_inv`` broadcast over each tile (the
        product in fp32, rounded once to bf16).
    """
    _check_fp8_scale(weight, scale_inv, block)
    out = torch.empty(weight.shape, dtype=torch.bfloat16, device=weight.device)
    for rows, values in iter_dequantize_fp8(weight, scale_inv, block, workspace=workspace):
        out[rows] = values
    return out


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
        self._headers: dict[str, dict] = {}
        self.weight_map = self._build_weight_map()
        self._workspace = Workspace()  # buffers of the FP8 dequantization
        self._check_dtypes()

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

    def _header(self, filename: str) -> dict:
        if filename not in self._headers:
            self._headers[filename] = read_safetensors_header(self.model_dir / filename)
        return self._headers[filename]

    def _check_dtypes(self) -> None:
        """Refuse stored dtypes that cannot be what the checkpoint was saved with.

        A safetensors header states each tensor's dtype and nothing ties it to the
        bytes: a header whose ``BF16`` was edited to ``F16`` (the same size, so every
        offset still fits) reads without error as other numbers, and the model runs
        to a meaningless perplexity. The shape and the dtype class of every tensor a
        block reads are checked against the model built from ``config.json`` where it
        is loaded (:func:`check_tensor`: a float weight stored
        as an integer type is refused there); what is left is a swap between float
        dtypes of one size, which only a rule about the whole checkpoint can catch:

        - the 16-bit float tensors all share one dtype, and it is the ``torch_dtype``
          (or ``dtype``) of ``config.json`` when that names a 16-bit dtype. Checkpoints
          are saved in one 16-bit dtype; fp32 tensors beside it are normal (router
          biases, some norms), and so are FP8 weights with their scales;
        - FP8 tensors are ``F8_E4M3`` (``F8_E5M2`` is not a weight format we read).

        Raises:
            CheckpointError: naming the shard, the tensors and what was expected.
        """
        dtypes: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for filename in sorted(set(self.weight_map.values())):
            for key, entry in self._header(filename).items():
                if key != "__metadata__" and isinstance(entry, dict):
                    dtypes[entry.get("dtype")].append((filename, key))
        if dtypes.get("F8_E5M2"):
            filename, key = dtypes["F8_E5M2"][0]
            raise CheckpointError(f"{self.model_dir / filename}: tensor {key!r} is F8_E5M2; FP8 checkpoints store "
                                  "F8_E4M3 weights with a weight_scale_inv, so the header is altered or the format "
                                  "unsupported")
        declared = str(self.config.get("torch_dtype") or self.config.get("dtype") or "").removeprefix("torch.")
        expected = {"bfloat16": "BF16", "float16": "F16"}.get(declared)
        half = {d: where for d, where in dtypes.items() if d in ("BF16", "F16")}
        if expected is None and len(half) < 2:
            return
        if expected is None:  # both, and config.json does not say which: the fewer ones are the odd ones
            expected = max(half, key=lambda d: len(half[d]))
        for dtype, where in half.items():
            if dtype != expected:
                names = ", ".join(f"{k!r} ({f})" for f, k in where[:3]) + (" ..." if len(where) > 3 else "")
                raise CheckpointError(
                    f"{self.model_dir}: {len(where)} tensor(s) are stored as {dtype} where the checkpoint's 16-bit "
                    f"dtype is {expected}{f' (config.json: {declared})' if declared else ''}: {names}. A header was "
                    "altered or shards of two checkpoints were mixed: download the shard(s) again")

    def _open(self, filename: str):
        path = self.model_dir / filename
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f"cannot read {path}: {err}. The file is truncated or corrupt: download it again."
            ) from err

    @property
    def is_fp8(self) -> bool:
        """Whether this is an FP8 checkpoint (``quant_method: fp8``, or ``weight_scale_inv`` tiles beside weights)."""
        qcfg = self.config.get("quantization_config") or {}
        return qcfg.get("quant_method") == "fp8" or any(k.endswith(SCALE_INV_SUFFIX) for k in self.weight_map)

    @property
    def keys(self) -> list[str]:
        """All tensor names stored in the checkpoint (FP8 scale tensors included)."""
        return list(self.weight_map)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Names of the stored tensors that start with ``prefix``, scale tensors excluded."""
        return [k for k in self.weight_map if k.startswith(prefix) and not k.endswith(SCALE_INV_SUFFIX)]

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, keys: Iterable[str], dequantize: bool = True) -> dict[str, torch.Tensor]:
        """Read tensors by full name, dequantizing FP8 weights to bf16.

        Tensors are views of the memory-mapped shard (no copy) except for
        dequantized FP8 weights.

        Args:
            keys: tensor names; ``*_scale_inv`` companions are read automatically.
            dequantize: False returns FP8 weights as stored, each with its
                ``*_scale_inv`` companion beside it.

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
        if not dequantize:
            return raw
        out = {}
        for key in keys:
            tensor = raw[key]
            scale = raw.get(key + SCALE_INV_SUFFIX)
            if tensor.dtype == torch.float8_e4m3fn:
                if scale is None:
                    raise CheckpointError(
                        f"FP8 tensor {key!r} in {self.model_dir} has no {key + SCALE_INV_SUFFIX!r} to dequantize it"
                    )
                tensor = dequantize_fp8_blockwise(tensor, scale, self.fp8_block, self._workspace)
            out[key] = tensor
        return out

    def iter_chunks(self, keys: Iterable[str], chunk_elements: int = FP8_CHUNK_ELEMENTS
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors ``keys`` as :meth:`read` gives them, read together, as ``(key, piece)`` in order.

        An FP8 weight comes as runs of its rows, dequantized a few tile rows at a
        time (each piece overwritten by the next); any other tensor comes whole.
        """
        keys = list(keys)
        raw = self.read(keys, dequantize=False)
        for key in keys:
            tensor, scale = raw.pop(key), raw.pop(key + SCALE_INV_SUFFIX, None)
            if tensor.dtype != torch.float8_e4m3fn or scale is None:
                yield key, tensor
                continue
            for _, values in iter_dequantize_fp8(tensor, scale, self.fp8_block, chunk_elements, self._workspace):
                yield key, values

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """``(dtype, shape)`` of tensor ``key`` as :meth:`read` gives it (bf16 for an FP8 weight), from the
        shard headers alone."""
        if key not in self.weight_map:
            raise CheckpointError(f"tensor {key!r} is not in {self.model_dir}")
        filename = self.weight_map[key]
        entry = self._header(filename).get(key)
        if entry is None or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.model_dir / filename} has no readable header entry for {key!r}")
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if dtype == torch.float8_e4m3fn and self.has(key + SCALE_INV_SUFFIX):
            dtype = torch.bfloat16
        return dtype, tuple(entry["shape"])

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Read every tensor under ``prefix``; returned names have the prefix removed."""
        keys = self.keys_with_prefix(prefix)
        if not keys:
            raise CheckpointError(f"no tensor named {prefix}* in {self.model_dir}")
        return {k[len(prefix):]: v for k, v in self.read(keys).items()}


# config fields that change between a checkpoint and its FP8 / BF16 / quantized twins
_NON_ARCH_KEYS = {"quantization_config", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                  "architectures", "use_cache", "compression_config"}


def norm_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype the checkpoint stores its norm weights in (fp32 when they differ): smoothing rounds the norm
    weights it rewrites to it."""
    dtypes = {reader.spec(key)[0] for key in reader.keys if key.endswith("norm.weight")}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


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


def check_tensor(where: Path, name: str, tensor: torch.Tensor, expected: torch.Tensor | tuple[int, ...]) -> None:
    """Refuse a stored tensor whose shape, or dtype class, is not that of the model built from ``config.json``.

    Args:
        where: the checkpoint folder (named in the message).
        name: the tensor's full name.
        tensor: as read (FP8 weights already dequantized).
        expected: the parameter of the module built on the meta device, or the shape
            a float tensor must have.

    Raises:
        CheckpointError: naming the tensor, the folder and expected vs found.
    """
    shape = tuple(expected) if isinstance(expected, tuple) else tuple(expected.shape)
    floating = True if isinstance(expected, tuple) else expected.dtype.is_floating_point
    if tuple(tensor.shape) != shape:
        raise CheckpointError(
            f"{name} in {where} has shape {tuple(tensor.shape)} but config.json implies {shape}: the weights and "
            "config.json do not belong together")
    if floating and (not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1):
        raise CheckpointError(
            f"{name} in {where} is stored as {str(tensor.dtype).removeprefix('torch.')} but the model reads a float "
            "tensor there: the shard's header was altered or the file belongs to another format; download it again")
