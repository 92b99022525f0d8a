"""Read a block's (or sub-module's) tensors from a checkpoint into a module built on the meta device.

The one state loader of the runtime: :class:`~cores.models.streaming.StreamingModel` fills FP blocks
with it, and :func:`~cores.models.deployed.load_deployed_block` fills deployed blocks once their
quantized weights have been decoded. Both therefore refuse the same things the same way: a tensor the
module lacks, a parameter the checkpoint lacks, a shape or dtype class that ``config.json`` does not imply.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..utils.checkpoint import CheckpointError, CheckpointReader, check_tensor

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Stored buffers that older checkpoints carry and no block reads."""


def read_state(reader: CheckpointReader, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The tensors stored under ``prefix`` (names relative to it), less :data:`IGNORED_SUFFIXES` and
    the relative prefixes in ``skip``.

    Raises:
        CheckpointError: when nothing is stored under ``prefix``.
    """
    keys = [k for k in reader.keys_with_prefix(prefix) if not k[len(prefix):].startswith(skip)]
    if not keys:
        raise CheckpointError(f"no tensor named {prefix}* in {reader.model_dir}")
    return {k[len(prefix):]: v for k, v in reader.read(keys).items() if not k.endswith(IGNORED_SUFFIXES)}


def assign_state(module: nn.Module, state: dict[str, Tensor], reader: CheckpointReader, prefix: str,
                 where: str, against: str, convert: Callable[[str, Tensor], Tensor], skip: tuple[str, ...] = ()
                 ) -> None:
    """Check ``state`` against ``module`` (built on the meta device) and assign it, each tensor through
    ``convert(name, tensor)`` (its device and dtype).

    Args:
        module: the module to fill; its entries under the relative prefixes ``skip`` stay unfilled.
        state: tensors by name relative to ``module`` (as :func:`read_state` gives them).
        reader: the checkpoint they came from (named in messages).
        prefix: ``module``'s full name followed by a dot (named in messages).
        where: what ``module`` is, and ``against`` what it was built from, for the mismatch message
            (``"block 3 of /models/x does not match its config (model_type 'llama'): ..."``).
        convert: ``(relative name, tensor) -> tensor`` to assign.
        skip: relative name prefixes left unfilled (their absence is not an error).

    Raises:
        CheckpointError: naming the missing and unexpected tensors, or the first tensor whose shape or
            dtype class does not fit.
    """
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where} does not match {against}: missing {[prefix + k for k in missing]}, "
                              f"unexpected {[prefix + k for k in unexpected]}")
    for key, tensor in state.items():
        check_tensor(reader.model_dir, prefix + key, tensor, expected[key])
    module.load_state_dict({k: convert(k, v) for k, v in state.items()}, assign=True, strict=not skip)
