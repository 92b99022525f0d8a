"""Safetensors files streamed to disk piece by piece: the one writer of the calibration dump and of deploy.

A :class:`StreamedFile` is planned before anything is written: the name, dtype and
shape of each of its tensors (:class:`TensorSpec`). Its header goes first
(:func:`safetensors_header`), then the data of each tensor is placed at its offset
as its pieces (consecutive runs of its rows) arrive, so no tensor is ever held
whole. A :class:`PieceWriter` does the writes, in the caller or on a thread of its
own shared by several files.

The file is written under a temporary name (:func:`cores.utils.io.temp_path`) and
takes its final name in :meth:`StreamedFile.close`, once every tensor arrived whole
and the file reads back as planned; a caller may record the complete temporary file
(size, checksum) before that rename. A file that never gets there keeps its
temporary name (deleted by :meth:`StreamedFile.abandon`, or by
:func:`cores.utils.io.remove_stale_temps` after a ``kill -9``), so a file under its
final name is always complete.

Errors are raised as the ``error`` class attribute of the two classes, which a
stage sets to its own exception type by subclassing (deploy: ``DeployError``).
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import SAFETENSORS_DTYPES, read_safetensors_header
from .io import temp_path

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
"""torch dtypes -> safetensors dtype names."""

WRITE_PIECE_BYTES = 2 << 20
"""Size of the buffers that :class:`PieceWriter` copies pieces into and writes from."""

WRITE_BUFFERS = 4
"""Buffers of a background :class:`PieceWriter`: the bytes in flight at most (8 MiB)."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of a file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> TensorSpec:
        return cls(name, tensor.dtype, tuple(tensor.shape))


def safetensors_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None,
                       metadata_last: bool = False) -> tuple[dict, bytes, dict[str, int]]:
    """The header of a safetensors file holding ``specs``, laid out by decreasing element size.

    Tensors keep their given order within one element size, and every one starts at
    a multiple of its element size. The JSON is compact and padded with spaces to a
    multiple of 8 bytes, as ``safetensors`` pads it.

    Args:
        specs: The tensors.
        metadata: The ``__metadata__`` entry (string -> string); None or empty: none.
        metadata_last: Put ``__metadata__`` after the tensors instead of first (where
            ``safetensors`` puts it); the calibration dump's files have it there.

    Returns:
        ``(header, raw, offsets)``: the header as a dict (as
        :func:`cores.utils.checkpoint.read_safetensors_header` reads it back), the bytes
        that start the file (8-byte little-endian length + JSON), and each tensor's
        offset from the start of the data.
    """
    header: dict = {"__metadata__": metadata} if metadata and not metadata_last else {}
    offsets: dict[str, int] = {}
    offset = 0
    for spec in sorted(specs, key=lambda s: -s.dtype.itemsize):  # stable: given order within a size
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offsets[spec.name] = offset
        offset += spec.nbytes
    if metadata and metadata_last:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return header, struct.pack("<Q", len(raw)) + raw, offsets


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` (a bytes-like object) at ``offset`` of ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class PieceWriter:
    """Writes the bytes of tensors at file offsets through reused buffers, in the caller or on a thread.

    Bytes are copied into a buffer of at most :data:`WRITE_PIECE_BYTES` and
    written from there: a tensor that is a view of a memory-mapped source shard is
    faulted in by that plain copy, while handing the mapping to ``write()`` makes
    the kernel fault it in page by page, about twice as slow.

    In the background, :meth:`write` copies into one of :data:`WRITE_BUFFERS`
    buffers (waiting for a free one, which bounds the bytes in flight) and the
    writes run on a thread of their own, in order, with the functions given to
    :meth:`submit` (closing a file once its writes are done): torch copies and
    ``os.pwrite`` release the GIL, so the file writes overlap the caller's
    compute. The caller may overwrite its tensor as soon as :meth:`write`
    returns. After a failure the thread skips every later job and the next
    :meth:`write`, :meth:`submit` or :meth:`flush` raises :attr:`error`.

    Args:
        background: Run the jobs on a thread of its own (then :meth:`close` it) instead of in the caller.
    """

    error: type[Exception] = RuntimeError
    """What a failed background job is raised as."""
    what = "a file"
    """What the writes make, as the failure names it."""

    def __init__(self, background: bool = False):
        self._free: queue.SimpleQueue[Tensor] = queue.SimpleQueue()
        for _ in range(WRITE_BUFFERS if background else 1):
            self._free.put(torch.empty(WRITE_PIECE_BYTES, dtype=torch.uint8))
        self._jobs: queue.Queue[tuple[Callable[[], None], Tensor | None] | None] | None = None
        self._error: Exception | None = None
        if background:
            self._jobs = queue.Queue()
            self._thread = threading.Thread(target=self._run, name="piece-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            run, buffer = job
            try:
                if self._error is None:
                    run()
            except Exception as err:  # raised in the caller by its next call
                self._error = err
            finally:
                if buffer is not None:
                    self._free.put(buffer)
                self._jobs.task_done()
        self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self.error(f"writing {self.what} failed: {self._error}") from self._error

    def write(self, fd: int, offset: int, tensor: Tensor) -> None:
        """Write the raw bytes of ``tensor`` (native byte order) at ``offset`` of ``fd``.

        Raises:
            error: When an earlier job failed.
        """
        self._raise()
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, data.numel(), WRITE_PIECE_BYTES):
            buffer = self._free.get()
            piece = buffer[:min(WRITE_PIECE_BYTES, data.numel() - start)].copy_(data[start:start + WRITE_PIECE_BYTES])
            if self._jobs is None:
                try:
                    _pwrite_all(fd, piece.numpy(), offset + start)
                finally:
                    self._free.put(buffer)
            else:
                self._jobs.put((lambda piece=piece, at=offset + start: _pwrite_all(fd, piece.numpy(), at), buffer))

    def submit(self, run: Callable[[], None]) -> None:
        """Run ``run()`` once every write before it is done: on the thread, or at once.

        Raises:
            error: When an earlier job failed (or, at once, whatever ``run`` raises).
        """
        self._raise()
        if self._jobs is None:
            run()
        else:
            self._jobs.put((run, None))

    def flush(self) -> None:
        """Wait until every job so far is done.

        Raises:
            error: When one of them failed.
        """
        if self._jobs is not None:
            self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Run the pending jobs and stop the thread (a failure is left to :meth:`flush`)."""
        if self._jobs is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class StreamedFile:
    """One safetensors file whose tensors arrive piece by piece, under a temporary name until complete.

    The header is written at once (:func:`safetensors_header`); the data of each
    tensor is placed at its offset as its pieces (consecutive runs of its rows)
    arrive, in any order of tensors. Use it as a context manager to have it
    abandoned when the body raises before :meth:`close`.

    Args:
        path: The final file name; data goes to a hidden temporary name until :meth:`close`.
        specs: The tensors.
        metadata: The header's ``__metadata__`` (None: none).
        writer: Who writes the pieces (a background one may be shared by several
            files); None: they are written in :meth:`write`.
        metadata_last: Put ``__metadata__`` after the tensors (see :func:`safetensors_header`).
    """

    error: type[Exception] = RuntimeError
    """What pieces that do not fit the plan, and an incomplete or unreadable file, are raised as."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None,
                 writer: PieceWriter | None = None, metadata_last: bool = False):
        self.path, self.specs = Path(path), {s.name: s for s in specs}
        self.tmp = temp_path(self.path)
        self.writer = PieceWriter() if writer is None else writer
        self.header, raw, self.offsets = safetensors_header(specs, metadata, metadata_last)
        self.data_start = len(raw)
        self.size = self.data_start + sum(s.nbytes for s in specs)
        self.written = dict.fromkeys(self.specs, 0)
        self.unfinished = {s.name for s in specs if s.nbytes}
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        _pwrite_all(self.fd, raw, 0)

    def __enter__(self) -> StreamedFile:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abandon()

    def write(self, name: str, piece: Tensor) -> bool:
        """Append ``piece`` to tensor ``name``; returns whether the tensor is complete.

        Raises:
            error: When the file has no tensor ``name``, the piece's dtype differs
                from the plan or it overruns the tensor, or an earlier write failed.
        """
        spec = self.specs.get(name)
        if spec is None:
            raise self.error(f"{name} is not planned in {self.path.name}")
        done, nbytes = self.written[name], piece.numel() * piece.element_size()
        if piece.dtype != spec.dtype or done + nbytes > spec.nbytes:
            raise self.error(f"{name}: got {nbytes} bytes of {piece.dtype} after {done}, but the plan has "
                             f"{spec.nbytes} bytes of {spec.dtype} {list(spec.shape)}")
        self.writer.write(self.fd, self.data_start + self.offsets[name] + done, piece)
        self.written[name] = done + nbytes
        if self.written[name] == spec.nbytes:
            self.unfinished.discard(name)
            return True
        return False

    @property
    def complete(self) -> bool:
        return not self.unfinished

    def abandon(self) -> None:
        """Close and delete the unfinished file (no write of it may be in flight): a rerun writes it whole."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)

    def close(self, sync: bool = False, before_rename: Callable[[Path], None] | None = None) -> None:
        """Check that every tensor arrived whole and the file reads back as planned, then rename it.

        Call it once its writes are done: at once when its writer writes in the caller,
        else through :meth:`PieceWriter.submit` (jobs run in order).

        Args:
            sync: ``fsync`` the file before it is checked (its bytes are on disk before it is recorded).
            before_rename: Called with the complete temporary file just before the rename
                (to record its size and checksum).

        Raises:
            error: When a tensor is incomplete or the file does not read back.
        """
        fd, self.fd = self.fd, None
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        missing = [n for n, s in self.specs.items() if self.written[n] != s.nbytes]
        if missing:
            raise self.error(f"{self.path.name}: tensors {missing[:4]} were not written whole")
        if self.tmp.stat().st_size != self.size or read_safetensors_header(self.tmp) != self.header:
            raise self.error(f"{self.tmp} does not read back as written")
        if before_rename is not None:
            before_rename(self.tmp)
        self.tmp.replace(self.path)
