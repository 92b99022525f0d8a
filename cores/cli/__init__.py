"""The commands (one module each: ``extract``, ``train``, ``deploy``, ``eval``, ``quantize``; the top-level
scripts and the ``blockptq-*`` console scripts run their ``main``) and their validation layer: every bad
flag, path or device is refused before work starts.

Each check raises :class:`UsageError` naming the flag, the value and what to do;
:func:`run_main` turns it, and every other error a user can cause (a corrupt
checkpoint, a dump or param dir of another run, an unwritable disk ...), into one
logged line and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..calibrator.dump import DumpError
from ..calibrator.jobs import TrainJobError
from ..calibrator.params import ParamDirError
from ..deploy.writer import DeployError
from ..models.registry import UnsupportedModelError
from ..utils.checkpoint import CheckpointError
from ..utils.config import build_config
from ..utils.data import DatasetNotFoundError
from ..utils.io import temp_path

EXIT_USAGE = 2


class UsageError(ValueError):
    """A flag's value cannot work; the message names the flag and what to do instead."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, CheckpointError, UnsupportedModelError, DumpError, ParamDirError, DeployError, DatasetNotFoundError,
    TrainJobError, ValueError, FloatingPointError, OSError,
)
"""What a user's input or machine can cause: reported in one line with exit code 2.
``OSError`` covers what no check can foresee (a disk that fills up or turns read-only
mid-run); its message names the file. A failed parallel training job (``TrainJobError``)
names the job and its error (the job's traceback is logged at DEBUG level)."""


def run_main(body: Callable[[], int], log: logging.Logger) -> int:
    """Run an entry point's ``body``; a :data:`USER_ERRORS` error is logged as one line and gives exit code 2."""
    try:
        return body()
    except USER_ERRORS as err:
        message = str(err)
        if isinstance(err, OSError) and not isinstance(err, DatasetNotFoundError):
            message += " (check that the path exists, that its folder is writable and that the disk has space)"
        log.error("%s", message)
        return EXIT_USAGE


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum`` (argparse names the flag when it is not)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def check_device(flag: str, dev: str | int | None) -> str | None:
    """The device ``dev`` names (``N`` is the seed's spelling of ``cuda:N``), if this machine has it.

    Raises:
        UsageError: for anything but ``cpu``, ``cuda``, ``cuda:N`` or ``N``, and for a
            CUDA device that torch cannot use here.
    """
    if dev is None:
        return None
    dev = str(dev)
    spec = f"cuda:{dev.strip()}" if dev.strip().isdigit() else dev.strip()
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", spec)
    if match is None:
        raise UsageError(f"{flag} {dev!r} is not a device: use cpu, cuda, cuda:N or N (= cuda:N)")
    if spec == "cpu":
        return spec
    alias = f" (= {spec})" if spec != dev else ""
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise UsageError(f"{flag} {dev}{alias}: torch {torch.__version__} ({build}) finds no CUDA device on this "
                         "machine; use --dev cpu, or run on a machine with a GPU")
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"{flag} {dev}{alias}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return spec


def _writable_dir(flag: str, folder: Path, target: Path) -> None:
    """Raise unless ``folder`` (an existing folder) lets this process create files in it."""
    ok = os.access(folder, os.W_OK | os.X_OK)
    if ok:  # and try: os.access can pass where a write fails (some network and FUSE file systems)
        probe = temp_path(folder / "write-probe")  # a kill right here leaves a file the stages clean up
        try:
            probe.touch(exist_ok=False)
        except OSError:
            ok = False
        else:
            probe.unlink()
    if not ok:
        where = "it" if folder == target else f"its folder {folder}"
        raise UsageError(f"{flag} {target}: {where} is not writable (permission denied or a read-only file system); "
                         "choose a writable location")


def _check_creatable(flag: str, path: Path) -> None:
    """Raise unless ``path`` (absent, or to be replaced by a rename) can be made in its folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, so {path} cannot be created under it; "
                         "choose another path")
    _writable_dir(flag, parent, path)


def check_output_dir(flag: str, path: str | Path | None) -> None:
    """``path`` is a writable folder, or can be created as one.

    Raises:
        UsageError: when it is a file, lies under a file, or cannot be written.
    """
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        _check_creatable(flag, path)
    elif not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder; choose another path or remove the file")
    else:
        _writable_dir(flag, path, path)


def check_output_file(flag: str, path: str | Path | None) -> None:
    """``path`` can be written as a file (it is written by a rename in its folder).

    Raises:
        UsageError: when it is a folder, lies under a file, or its folder cannot be written.
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give the name of a file to write")
    _check_creatable(flag, path)


def check_output_folder(flag: str, path: str | Path) -> None:
    """A folder written as ``<path>.partial`` beside it and renamed to ``path`` when complete.

    Whether an existing folder may be replaced (``--overwrite``) is the stage's to say.

    Raises:
        UsageError: when ``path`` is a file (only folders are replaced), lies under a
            file, or its folder or its staging folder cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder (--overwrite replaces a folder only); "
                         "remove the file or choose another path")
    _check_creatable(flag, path)
    check_output_dir(f"{flag} (its staging folder)", path.with_name(path.name + ".partial"))


def command_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a command: described by the first paragraph of ``doc``, flags defaulting to None (so that
    :func:`config_from_args` tells a flag not given from one given), and ``--config``: a YAML file of options,
    which flags given override."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], argument_default=None)
    p.add_argument("--config", help="YAML file with any of the options below, by field name (flags override it)")
    return p


def config_from_args(cls: type, a: argparse.Namespace, rename: dict[str, str] | None = None,
                     base: dict | None = None, skip: Sequence[str] = ()):
    """``cls`` (a run config dataclass) from ``a.config``'s YAML file and the flags that were given.

    Precedence: the dataclass defaults < ``base`` < the YAML file < the flags (argparse defaults must be None,
    so a flag not given does not hide the file's value). ``--dev`` fills the ``device`` field.

    Args:
        cls: the config dataclass.
        a: the parsed flags; every entry but ``config`` and ``skip`` names a field (after ``rename``).
        rename: flag name -> field name, besides ``dev`` -> ``device``.
        base: field values below the YAML file's (a recipe's training options).
        skip: entries of ``a`` that are not fields (flags the command resolved itself).

    Raises:
        ValueError: for a YAML key that is not a field (naming the valid ones) and for a required field that
            neither gives.
    """
    names = {"dev": "device", **(rename or {})}
    flags = {names.get(k, k): v for k, v in vars(a).items() if k != "config" and k not in skip}
    return build_config(cls, a.config, flags, base=base)


def device_flag(a: argparse.Namespace) -> str:
    """How to name the device option in a message: ``--dev``, or the YAML file it came from."""
    return f"device (in {a.config})" if a.dev is None and a.config else "--dev"
