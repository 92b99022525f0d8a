"""Run a checkpoint one decoder block at a time.

The hidden states of all sequences live in a :class:`HiddenStore` (RAM, or a file
on disk when they do not fit); each block is built on the meta device, filled with
only its own tensors from the safetensors shards, run over every sequence, and
freed before the next one is read. Peak memory is one block plus the batch in
flight, whatever the depth of the model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

from ..formats.compressed_tensors import DEPLOY_REPORT
from ..utils.checkpoint import CheckpointError, CheckpointReader, check_tensor
from .deployed import check_deployed_files, load_deployed_block
from .layers import RMSNorm, rotary_cos_sin, rotary_inv_freq
from .registry import get_family

log = logging.getLogger(__name__)

BlockTransform = Callable[[int, nn.Module], nn.Module]
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


class HiddenStore:
    """Hidden states ``[n, seq, hidden]`` of all sequences, in RAM or in a file.

    Args:
        shape: ``(n, seq, hidden)``.
        dtype: storage dtype.
        path: file to hold the states; None keeps them in RAM.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, path: Path | None = None):
        self.shape, self.dtype, self.path = shape, dtype, path
        self.row_bytes = shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
        if path is None:
            self._ram = torch.empty(shape, dtype=dtype)
            self._file = None
        else:
            self._ram = None
            self._file = open(path, "w+b")
            self._file.truncate(shape[0] * self.row_bytes)

    @classmethod
    def create(
        cls, shape: tuple[int, int, int], dtype: torch.dtype, offload_dir: str | Path | None = None
    ) -> HiddenStore:
        """A store in RAM, or on disk when ``offload_dir`` is given or RAM is short.

        Without ``offload_dir`` the states go to a temporary file when they would
        take more than half of the currently available memory.
        """
        nbytes = shape[0] * shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
        if offload_dir is None and nbytes > psutil.virtual_memory().available // 2:
            offload_dir = tempfile.gettempdir()
            log.info("hidden states need %.1f GiB: offloading them to %s", nbytes / 2**30, offload_dir)
        if offload_dir is None:
            return cls(shape, dtype)
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="hidden-", suffix=".bin", dir=offload_dir)
        os.close(fd)
        return cls(shape, dtype, Path(name))

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        if self._ram is not None:
            return self._ram[lo:hi]
        out = torch.empty((hi - lo, *self.shape[1:]), dtype=self.dtype)
        self._file.seek(lo * self.row_bytes)
        self._file.readinto(out.view(-1).view(torch.uint8).numpy())
        return out

    def write(self, lo: int, value: torch.Tensor) -> None:
        value = value.to("cpu", self.dtype)
        if self._ram is not None:
            self._ram[lo:lo + len(value)] = value
            return
        self._file.seek(lo * self.row_bytes)
        self._file.write(value.contiguous().view(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)
            self._file = None
        self._ram = None

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Sum of token negative log-likelihoods without materialising all logits.

    Args:
        hidden: ``[T, H]`` final-norm outputs.
        targets: ``[T]`` next-token ids.
        weight: ``[V, H]`` output embedding.
        chunk: vocabulary rows per matmul.

    Returns:
        fp64 scalar: ``sum_t logsumexp(logits_t) - logits_t[target_t]``.
    """
    lse = torch.full((hidden.shape[0],), float("-inf"), device=hidden.device)
    target_logit = torch.zeros(hidden.shape[0], device=hidden.device)
    for lo in range(0, weight.shape[0], chunk):
        logits = (hidden @ weight[lo:lo + chunk].T).float()
        lse = torch.logaddexp(lse, logits.logsumexp(-1))
        inside = (targets >= lo) & (targets < lo + chunk)
        rows = inside.nonzero(as_tuple=True)[0]
        target_logit[rows] = logits[rows, targets[rows] - lo]
    return (lse - target_logit).double().sum()


class StreamingModel:
    """A checkpoint on disk, run block by block.

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
                (:func:`~cores.quantization.promote_unquantized`).
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
        expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
        keys = [k for k in self.reader.keys_with_prefix(prefix) if not k[len(prefix):].startswith(skip)]
        if not keys:
            raise CheckpointError(f"no tensor named {prefix}* in {self.reader.model_dir}")
        state = {k[len(prefix):]: v for k, v in self.reader.read(keys).items() if not k.endswith(_IGNORED_SUFFIXES)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"block {idx} of {self.reader.model_dir} does not match its config "
                f"(model_type {self.config.model_type!r}): missing {[prefix + k for k in missing]}, "
                f"unexpected {[prefix + k for k in unexpected]}"
            )
        for key, tensor in state.items():
            check_tensor(self.reader.model_dir, prefix + key, tensor, expected[key])
        keep = self.family.fp32_suffixes

        def dtype(key: str, tensor: torch.Tensor) -> torch.dtype:
            return torch.float32 if keep and key.endswith(keep) else tensor.dtype if stored_dtype else self.dtype

        module.load_state_dict({k: v.to(self.device, dtype(k, v)) for k, v in state.items()}, assign=True,
                               strict=not skip)

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

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, store: HiddenStore, batch_size: int) -> None:
        """Write the token embeddings of ``input_ids`` ``[n, seq]`` into ``store``."""
        weight = self.embed_weight()
        for lo in range(0, len(input_ids), batch_size):
            store.write(lo, F.embedding(input_ids[lo:lo + batch_size].to(self.device), weight))

    @torch.no_grad()
    def run_blocks(
        self,
        store: HiddenStore,
        batch_size: int,
        blocks: range | None = None,
        block_transform: BlockTransform | None = None,
        on_block_input: Callable[[int, HiddenStore], None] | None = None,
    ) -> None:
        """Push the states in ``store`` through ``blocks`` in place, one block at a time.

        Args:
            store: hidden states, replaced by each block's output.
            batch_size: sequences per forward.
            blocks: block indices to run (default: all).
            block_transform: ``(idx, block) -> block`` applied after loading
                (e.g. to fake-quantize it).
            on_block_input: called with ``(idx, store)`` before block ``idx`` runs.
        """
        blocks = range(self.num_blocks) if blocks is None else blocks
        cos, sin = self.rotary(store.shape[1])
        for idx in tqdm(blocks, desc="blocks", unit="block"):
            if on_block_input is not None:
                on_block_input(idx, store)
            block = self.load_block(idx)
            if block_transform is not None:
                block = block_transform(idx, block)
            label = f"block {idx + 1}/{self.num_blocks}: forward"
            for lo in tqdm(range(0, len(store), batch_size), desc=label, leave=False, unit="batch"):
                hidden = store.read(lo, lo + batch_size).to(self.device, self.dtype)
                store.write(lo, block(hidden, cos, sin))
            del block

    @torch.no_grad()
    def nll(self, store: HiddenStore, input_ids: torch.Tensor, batch_size: int) -> tuple[float, int]:
        """Final norm + ``lm_head``: summed next-token NLL over all sequences and its token count."""
        norm, weight = self.final_norm(), self.lm_head_weight()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for lo in tqdm(range(0, len(store), batch_size), desc="lm_head", leave=False, unit="batch"):
            hidden = norm(store.read(lo, lo + batch_size).to(self.device, self.dtype))[:, :-1]
            targets = input_ids[lo:lo + batch_size, 1:].to(self.device)
            total += chunked_nll(hidden.reshape(-1, self.hidden_size), targets.reshape(-1), weight).cpu()
            count += targets.numel()
        return float(total), count

    def sequence_nll(
        self,
        input_ids: torch.Tensor,
        batch_size: int = 1,
        offload_dir: str | Path | None = None,
        block_transform: BlockTransform | None = None,
    ) -> tuple[float, int]:
        """Summed next-token NLL of ``input_ids`` ``[n, seq]`` through the whole model."""
        shape = (input_ids.shape[0], input_ids.shape[1], self.hidden_size)
        with HiddenStore.create(shape, self.dtype, offload_dir) as store:
            self.embed(input_ids, store, batch_size)
            self.run_blocks(store, batch_size, block_transform=block_transform)
            return self.nll(store, input_ids, batch_size)
