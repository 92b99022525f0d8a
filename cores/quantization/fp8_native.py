"""The fused native FP8 tile kernel (``fp8_block_kernel.c``): built at first use, loaded through ``ctypes``.

One pass over each tile of a CPU weight does what the torch path of :mod:`cores.quantization.fp8_block` does
in several: the tile absmax and its ``scale_inv`` (mode ``max``), the e4m3 codes of ``w / scale_inv`` (any
mode; the scales of the other modes are computed in torch and passed in) and, for a checked weight, the
aggregates :class:`cores.deploy.verify.WeightCheck` keeps of the error ``w - codes * scale_inv``, which is
never stored. Codes and scales are bit-identical to the torch path's (``tests/quantization/test_fp8_native.py``).

Build (a few seconds, once): the system C compiler (``$CC``, else ``cc``, else ``gcc``) with :data:`FLAGS`
and :data:`ARCH_FLAGS`, into ``$XDG_CACHE_HOME/blockptq`` (default ``~/.cache/blockptq``;
a per-user folder of the temporary directory where that is not writable) under a name keyed by a hash of the
source, the compiler, the flags and the CPU; written to a temporary name and renamed, so that concurrent
processes never load a partial file. When no compiler is found, the build or the load fails, or
``BLOCKPTQ_NATIVE=0`` is set, :func:`native_library` gives None and callers keep the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fp8_block_kernel.c")
FLAGS: tuple[str, ...] = ("-O3", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11")
"""Always: no ``-ffast-math``, and no fused multiply-add (torch's CPU kernels round each product)."""
ARCH_FLAGS: tuple[str, ...] = ("-march=native",)
"""The host's vector units: the kernel is written in 8-lane vectors (AVX2: one instruction each); built for
the baseline x86-64 ISA (SSE2: no byte shuffle, no 32-bit max) it is slower than the torch path, so a compiler
that cannot target the host leaves the torch path on. The cache key holds the CPU's model and flags."""
DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
"""The weight dtypes the kernel reads (its ``dtype`` codes)."""
OVERFLOW_GUARD = 3.4e38 / 4
"""A sum at or past this may have overflowed the torch path's fp32 reductions: that run takes the torch path,
so that the check's verdict (an overflow is a non-finite FAIL) stays the same."""


@dataclass(frozen=True)
class Fp8ErrorStats:
    """The aggregates of the error ``e = x - codes * scale_inv`` of some values ``x`` of a weight (sums in
    double).

    Attributes:
        xx: ``sum x^2``.
        xe: ``sum x e``.
        ee: ``sum e^2``.
        abs: ``sum |e|``.
        count: How many values.
        max_abs: ``max |e|``.
        peak_src: ``max |x| a_j`` (``a``: per-input-channel peak weights, or 1).
        peak_err: ``max |e| a_j``.
    """

    xx: float
    xe: float
    ee: float
    abs: float
    count: int
    max_abs: float
    peak_src: float
    peak_err: float


def compiler() -> str | None:
    """The C compiler the kernel is built with: ``$CC``, else ``cc``, else ``gcc`` on ``PATH`` (None: none)."""
    cc = os.environ.get("CC")
    return (shutil.which(cc) if cc else None) or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/blockptq``, default ``~/.cache/blockptq``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "blockptq"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _private_tmp() -> Path | None:
    """``$TMPDIR/blockptq-<uid>``, made ``0700``; None unless it is ours and no one else can write it (a library
    loaded from a shared folder could be anyone's)."""
    if not hasattr(os, "getuid"):
        return None
    folder = Path(tempfile.gettempdir()) / f"blockptq-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
    except OSError:
        return None
    return folder if st.st_uid == os.getuid() and not st.st_mode & 0o022 and folder.is_dir() and \
        not folder.is_symlink() else None


def _build(cc: str, flags: tuple[str, ...]) -> Path:
    """The cached shared library built with ``flags`` (built now if missing): in :func:`cache_dir`, else (not
    writable) in a per-user folder of the temporary directory.

    Raises:
        OSError, subprocess.SubprocessError: When no folder is writable or the compiler fails.
    """
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cc.encode(), " ".join(flags).encode(),
                                     _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
    name = f"fp8_block_kernel-{key}.so"
    folders = [cache_dir(), _private_tmp()]
    for folder in folders:
        if folder is not None and (folder / name).exists():
            return folder / name
    for folder in folders:
        try:
            if folder is None:
                raise OSError(f"{cache_dir()} is not writable and no private temporary folder could be made")
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=folder)
        except OSError:
            if folder is folders[-1]:
                raise
            continue
        os.close(fd)
        try:
            start = time.perf_counter()
            subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                           timeout=120)
            os.replace(tmp, folder / name)  # atomic: a concurrent build of the same key writes the same bytes
            log.info("fp8: built the native kernel in %.2f s (%s)", time.perf_counter() - start, folder / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return folder / name
    raise OSError("no folder to build the kernel in")


def _why(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        err = (exc.stderr or b"").decode(errors="replace").strip()
        return err[-300:] if err else f"exit status {exc.returncode}"
    return str(exc)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the signature of ``fp8_block_encode`` declared."""
    fn = lib.fp8_block_encode
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def _load() -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        log.info("fp8: no C compiler (cc, gcc or $CC) found: the native kernel is off, using the torch path")
        return None
    try:
        return _declare(ctypes.CDLL(str(_build(cc, FLAGS + ARCH_FLAGS))))
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        log.info("fp8: the native kernel did not build or load (%s): using the torch path", _why(exc))
        return None


@functools.cache
def _off() -> None:
    log.debug("fp8: BLOCKPTQ_NATIVE=0: the native kernel is off, using the torch path")


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel, or None: ``BLOCKPTQ_NATIVE=0``, no compiler, or a failed build (logged once)."""
    if os.environ.get("BLOCKPTQ_NATIVE", "1").strip() == "0":
        _off()
        return None
    return _load()


def native_usable(weight: Tensor) -> bool:
    """Whether :func:`encode_tiles` takes ``weight``: a 2-D fp32 / bf16 / fp16 CPU tensor, the kernel loaded."""
    return (weight.device.type == "cpu" and weight.dtype in DTYPES and weight.dim() == 2
            and native_library() is not None)


@torch.no_grad()
def encode_tiles(weight: Tensor, block: tuple[int, int], scale_inv: Tensor | None, check: bool = False,
                 peak_weight: Tensor | None = None) -> tuple[Tensor, Tensor, Fp8ErrorStats | None] | None:
    """``float8_e4m3fn(w / scale_inv[tile])`` of a weight the kernel takes (:func:`native_usable`), as the torch
    path casts it: torch's CPU cast saturates at +-448, so the clamp of the clipping modes is implied.

    Args:
        weight: ``[rows, in]``, fp32, bf16 or fp16, on CPU, unit column stride (else copied).
        block: The tile shape.
        scale_inv: fp32 ``[ceil(rows / b0), ceil(in / b1)]``, or None: the absmax scales of mode ``max``,
            computed here.
        check: Also return the error's :class:`Fp8ErrorStats`.
        peak_weight: Per-input-channel factors ``[in]`` of the peak error, or None.

    Returns:
        ``(codes, scale_inv, stats or None)``, or None when the weight holds a NaN or an infinity, a given
        scale is not finite and positive, or a sum of the check came close to fp32's range: the caller takes
        the torch path, whose result on such input is the reference.
    """
    lib = native_library()
    if weight.stride(1) != 1 or weight.stride(0) < weight.shape[1]:
        weight = weight.contiguous()
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    compute = scale_inv is None
    if compute:
        scale_inv = torch.empty(grid, dtype=torch.float32)
    else:
        if tuple(scale_inv.shape) != grid:
            raise ValueError(f"scales of shape {tuple(scale_inv.shape)} for a {rows}x{cols} weight in {block} "
                             "tiles")
        scale_inv = scale_inv.to("cpu", torch.float32).contiguous()
        if not bool((scale_inv > 0).all() & torch.isfinite(scale_inv).all()):
            return None  # w / s could be NaN, which the kernel does not cast as torch does
    pw = None
    if check and peak_weight is not None:
        pw = peak_weight.to("cpu", torch.float32).contiguous()
        if pw.shape != (cols,):
            raise ValueError(f"peak weights of shape {tuple(pw.shape)} for a weight of {cols} input channels")
    codes = torch.empty((rows, cols), dtype=torch.float8_e4m3fn)
    stats = (ctypes.c_double * 7)()
    rc = lib.fp8_block_encode(weight.data_ptr(), DTYPES[weight.dtype], rows, cols, weight.stride(0), block[0],
                              block[1], scale_inv.data_ptr(), int(compute), codes.data_ptr(),
                              None if pw is None else pw.data_ptr(), int(check), stats, torch.get_num_threads())
    if rc < 0:
        raise MemoryError("fp8: the native kernel could not allocate its per-tile statistics")
    if rc:
        return None
    if not check:
        return codes, scale_inv, None
    xx, xe, ee, ab, max_abs, peak_src, peak_err = stats
    if max(xx, ee, ab) >= OVERFLOW_GUARD:
        return None
    return codes, scale_inv, Fp8ErrorStats(xx, xe, ee, ab, rows * cols, max_abs, peak_src, peak_err)
