"""Per-input-channel activation statistics of every linear, from a calibration dump, for activation-aware FP8.

Each block is run once on its dumped input (``hidden_{i:03d}.safetensors`` of
``extract_calib_data.py``), in fp32, with a forward pre-hook on every
``nn.Linear`` that adds the squares of its input, channel by channel, and counts
its tokens: the mean square ``E[x_j^2]`` of input channel ``j`` of each linear, on
exactly the tokens it sees (a routed expert on the tokens its router sends it;
MoE routing is recomputed from the block input, as everywhere else). One block is
in memory at a time; the result of a block (one fp32 vector per linear) is written
to a small file of its own and read back when that block's weights are converted.
A linear that saw no token (an expert never routed to) gets no statistics and is
converted without them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..calibrator.dump import MANIFEST, DumpError, DumpFiles, DumpManifest
from ..models.streaming import StreamingModel
from ..utils.checkpoint import CheckpointReader, model_fingerprint
from ..utils.io import atomic_file, load_json
from .writer import DeployError

log = logging.getLogger(__name__)


def _stats_path(folder: Path, idx: int) -> Path:
    return folder / f"act_stats_{idx:03d}.safetensors"


@torch.no_grad()
def block_act_stats(block: nn.Module, prefix: str, batches, cos: torch.Tensor, sin: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """``{full weight name: E[x_j^2] per input channel}`` of every ``nn.Linear`` of ``block`` that saw a token.

    Args:
        block: The float block.
        prefix: Its name prefix (``model.layers.3.``).
        batches: Its input hidden states, ``[b, seq, hidden]`` at a time.
        cos, sin: The rotary tables of ``seq``.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def add(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if x.shape[0]:
                sums[name] = sums.get(name, 0) + x.square().sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    handles = [m.register_forward_pre_hook(hook(f"{prefix}{n}.weight")) for n, m in block.named_modules()
               if isinstance(m, nn.Linear)]
    try:
        for hidden in batches:
            block(hidden, cos, sin)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).contiguous() for name in sums}


def check_dump(reader: CheckpointReader, dump_dir: str | Path) -> DumpManifest:
    """The manifest of ``dump_dir``, checked to be a dump of the model ``reader`` reads.

    Raises:
        DumpError: When ``dump_dir`` is not a calibration dump.
        DeployError: When it was dumped from another model.
    """
    manifest = DumpManifest.load(dump_dir)
    fingerprint = model_fingerprint(reader)
    if manifest.model_fingerprint != fingerprint:
        raise DeployError(f"{dump_dir} was dumped from another model (fingerprint {manifest.model_fingerprint}, "
                          f"{reader.model_dir} is {fingerprint}): dump this model with extract_calib_data.py")
    return manifest


def dump_identity(dump_dir: str | Path) -> dict:
    """What identifies a dump in a deploy's identity: its manifest, with the size and digest of every file."""
    return load_json(Path(dump_dir) / MANIFEST, DumpError, "Rerun extract_calib_data.py.")


def collect_act_stats(model_dir: str | Path, dump_dir: str | Path, out_dir: Path, batch_size: int = 4) -> None:
    """Run every block of ``model_dir`` on its input from ``dump_dir`` and write each block's statistics to
    ``out_dir`` (see the module).

    Raises:
        DumpError: When ``dump_dir`` is not a calibration dump, or misses a block's file.
        DeployError: When the dump was made from another model.
    """
    model = StreamingModel(model_dir, device="cpu", dtype=torch.float32)
    manifest = check_dump(model.reader, dump_dir)
    files = DumpFiles(dump_dir)
    cos, sin = model.rotary(manifest.seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    for idx in tqdm(range(model.num_blocks), desc="activation statistics", unit="block"):
        dump = files.boundary(idx)
        block = model.load_block(idx)
        batches = (dump.read(lo, lo + batch_size).float() for lo in range(0, len(dump), batch_size))
        stats = block_act_stats(block, model.family.block_prefix(idx), batches, cos, sin)
        with atomic_file(_stats_path(out_dir, idx)) as tmp:
            save_file(stats, str(tmp))
        del block
    log.info("activation statistics of %d blocks from %s (%d samples x %d tokens)", model.num_blocks, dump_dir,
             manifest.n_samples, manifest.seq_len)


class ActStats:
    """The statistics :func:`collect_act_stats` wrote, read one block file at a time.

    Args:
        folder: Where they were written.
        layer_prefix: The decoder layers' name prefix (``model.layers.``).
    """

    def __init__(self, folder: Path, layer_prefix: str):
        self.folder, self.layer_prefix = folder, layer_prefix
        self._block: tuple[int, dict[str, torch.Tensor]] | None = None

    def get(self, weight: str) -> torch.Tensor | None:
        """``E[x_j^2]`` of the linear whose weight is ``weight``, or None when it saw no token."""
        head, _, rest = weight.partition(self.layer_prefix)
        idx = rest.split(".", 1)[0]
        if head or not idx.isdigit():
            return None
        idx = int(idx)
        if self._block is None or self._block[0] != idx:
            path = _stats_path(self.folder, idx)
            if not path.is_file():
                return None
            with safe_open(str(path), framework="pt") as f:
                self._block = idx, {k: f.get_tensor(k) for k in f.keys()}
        return self._block[1].get(weight)
