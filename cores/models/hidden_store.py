"""Hidden states ``[n, seq, hidden]`` of all calibration or evaluation sequences, in RAM or in a file.

The runtime pushes them through the model one block at a time (:mod:`cores.models.run`); the dump
writes them out (:mod:`cores.calibrator.dump`) and training reads its inputs from them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)


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
