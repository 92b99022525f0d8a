"""A checkpoint on disk, read one decoder block at a time.

:class:`StreamingModel` opens a Hugging Face folder (bf16, FP8 or deployed), builds each block on
the meta device and fills it with only its own tensors (:mod:`cores.models.block_state`), and reads
the few tensors outside the blocks (embedding, final norm, ``lm_head``). Running it over hidden
states is :mod:`cores.models.run`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from ..formats.compressed_tensors import DEPLOY_REPORT
from ..utils.checkpoint import CheckpointError, CheckpointReader, check_tensor
from .block_state import assign_state, read_state
from .deployed import check_deployed_files, load_deployed_block
from .layers import RMSNorm, rotary_cos_sin, rotary_inv_freq
from .registry import get_family

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto`` is bf16 on accelerators and fp32 on CPU (where bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def load_config(reader: CheckpointReader) -> PretrainedConfig:
    """The ``transformers`` config of a checkpoint whose ``model_type`` we support."""
    model_type = reader.config.get("model_type")
    get_family(model_type)  # refuse unsupported types before transformers guesses anything
    try:
        return AutoConfig.from_pretrained(reader.model_dir)
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"cannot parse {reader.model_dir / 'config.json'}: {err}") from err


class StreamingModel:
    """A checkpoint on disk, read block by block (run it with :mod:`cores.models.run`).

    Args:
        model_dir: Hugging Face model folder.
        device: where blocks run (``cpu``, ``cuda:0`` ...).
        dtype: compute dtype (``auto``, ``float32``, ``bfloat16``, ``float16`` or a torch dtype).
    """

    def __init__(self, model_dir: str | Path, device: str = "cpu", dtype: str | torch.dtype = "auto"):
        self.reader = CheckpointReader(model_dir)
        config = load_config(self.reader)
        self.family = get_family(config.model_type)
        self.config = self.family.decoder_config(config)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.num_blocks: int = self.config.num_hidden_layers
        self.hidden_size: int = self.config.hidden_size
        qcfg = self.reader.config.get("quantization_config") or {}
        self.deployed = qcfg.get("quant_method") == "compressed-tensors"
        if (self.reader.model_dir / DEPLOY_REPORT).is_file():
            check_deployed_files(self.reader.model_dir)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.dtype)

    def load_block(self, idx: int, skip: tuple[str, ...] = (), stored_dtype: bool = False) -> nn.Module:
        """Build block ``idx`` on the meta device and fill it with its checkpoint tensors.

        A deployed (compressed-tensors) checkpoint gives the frozen quantized block
        that its tensors describe.

        Args:
            idx: block index.
            skip: relative name prefixes (e.g. ``"mlp.experts."``) left unread, on
                the meta device: :meth:`load_submodule` reads them one at a time.
            stored_dtype: keep every tensor in the dtype the checkpoint stores (bf16 for an FP8
                source, whose weights dequantize to bf16) instead of the compute dtype; the
                trainer then quantizes the block and promotes all but the quantized weights
                (:func:`~cores.quantization.cast_for_compute`).
        """
        if self.deployed:
            return load_deployed_block(self, idx)
        with torch.device("meta"):
            block = self.family.build_block(self.config, idx)
        self._fill(idx, block, "", skip, stored_dtype)
        return block.eval().requires_grad_(False)

    def load_submodule(self, idx: int, block: nn.Module, name: str) -> nn.Module:
        """Read the tensors of ``name`` (e.g. ``"mlp.experts.3"``) of block ``idx`` into ``block``; returns it."""
        module = block.get_submodule(name)
        self._fill(idx, module, f"{name}.", ())
        return module.eval().requires_grad_(False)

    def _fill(self, idx: int, module: nn.Module, name: str, skip: tuple[str, ...], stored_dtype: bool = False) -> None:
        """Load ``module`` (block ``idx``'s sub-module at relative prefix ``name``) from the checkpoint."""
        prefix = self.family.block_prefix(idx) + name
        keep = self.family.fp32_suffixes

        def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
            dtype = torch.float32 if keep and key.endswith(keep) else tensor.dtype if stored_dtype else self.dtype
            return tensor.to(self.device, dtype)

        assign_state(module, read_state(self.reader, prefix, skip), self.reader, prefix,
                     f"block {idx} of {self.reader.model_dir}", f"its config (model_type {self.config.model_type!r})",
                     convert, skip)

    def _read_one(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``key`` (outside the blocks), checked to be a float tensor of ``shape``."""
        tensor = self.reader.read([key])[key]
        check_tensor(self.reader.model_dir, key, tensor, shape)
        return self._to_device(tensor)

    def embed_weight(self) -> torch.Tensor:
        return self._read_one(self.family.embed_key, (self.config.vocab_size, self.hidden_size))

    def lm_head_weight(self) -> torch.Tensor:
        if self.reader.has(self.family.lm_head_key):
            return self._read_one(self.family.lm_head_key, (self.config.vocab_size, self.hidden_size))
        if getattr(self.config, "tie_word_embeddings", False):
            return self.embed_weight()
        raise CheckpointError(
            f"{self.family.lm_head_key!r} is not in {self.reader.model_dir} and tie_word_embeddings is false"
        )

    def final_norm(self) -> RMSNorm:
        norm = self.family.norm(self.hidden_size, self.config.rms_norm_eps).to(self.device)
        norm.weight.data = self._read_one(self.family.norm_key, (self.hidden_size,))
        return norm.eval().requires_grad_(False)

    def reading_norm(self, idx: int) -> RMSNorm:
        """The norm that reads block ``idx``'s output: the next block's input norm, or the final norm."""
        if idx + 1 >= self.num_blocks:
            return self.final_norm()
        norm = self.family.norm(self.hidden_size, self.config.rms_norm_eps).to(self.device)
        norm.weight.data = self._read_one(self.family.block_prefix(idx + 1) + "input_layernorm.weight",
                                          (self.hidden_size,))
        return norm.eval().requires_grad_(False)

    def rotary(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = rotary_inv_freq(self.config, self.family.head_dim(self.config))
        return rotary_cos_sin(inv_freq, scaling, seq_len, self.dtype, self.device)

