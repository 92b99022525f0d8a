"""Per-block training jobs in parallel on one machine: :func:`~.trainer.run_training` in several processes.

Blocks are independent jobs, so ``jobs`` processes (started with ``spawn``) each train
every ``jobs``-th block of the range from the shared dump into the shared param dir, as
``torchrun`` ranks do, but without a process group: the parent waits for them, shows
one progress bar of the finished blocks (the children's bars are off) and raises
:class:`TrainJobError` when a job failed, after the others have finished. What finished
stays in the param dir, so a rerun resumes; a job whose blocks are all done is not
started again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch
from tqdm.auto import tqdm

from ..utils.distributed import Ranks
from ..utils.logging import setup_logging
from .dump import DumpManifest
from .params import ParamDir
from .trainer import TrainConfig, run_training

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often the parent looks for finished blocks while jobs run."""


class TrainJobError(RuntimeError):
    """A training job failed; the message names the job, its blocks and the job's error."""


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """One process's share of a parallel training run.

    Attributes:
        ranks: Its share (every ``world``-th block from ``rank``) and its GPU, ungrouped.
        blocks: The blocks of the share.
        device: ``cpu`` or ``cuda:N``.
        threads: CPU threads of the process (None: torch's default).
    """

    ranks: Ranks
    blocks: tuple[int, ...]
    device: str
    threads: int | None

    @property
    def name(self) -> str:
        return f"train job {self.ranks.rank + 1}/{self.ranks.world}"


def plan_jobs(cfg: TrainConfig, jobs: int, num_blocks: int) -> list[TrainJob]:
    """Split ``cfg``'s block range over at most ``jobs`` processes (no more than there are blocks).

    Devices: ``cpu``: every job on the CPU with ``cpu_count // jobs`` threads; ``cuda``: job ``i`` on
    ``cuda:{i % device_count}``; ``cuda:K``: every job on it.
    """
    end = num_blocks if cfg.end_block_idx is None else min(cfg.end_block_idx, num_blocks)
    blocks = range(cfg.start_block_idx, end)
    world = max(1, min(jobs, len(blocks)))
    out = []
    for rank in range(world):
        gpu, device, threads = 0, cfg.device, None
        if cfg.device == "cpu":
            threads = max(1, (os.cpu_count() or 1) // world)
        elif cfg.device.startswith("cuda"):
            index = cfg.device.partition(":")[2]
            gpu = int(index) if index else rank % max(1, torch.cuda.device_count())
            device = f"cuda:{gpu}"
        ranks = Ranks(rank, world, gpu, grouped=False)
        out.append(TrainJob(ranks, tuple(ranks.share(blocks)), device, threads))
    return out


def run_training_jobs(cfg: TrainConfig, jobs: int = 1) -> ParamDir:
    """Train ``cfg``'s blocks in ``jobs`` processes (``jobs == 1``: :func:`~.trainer.run_training` in this one).

    Raises:
        ValueError: for ``sequential`` training with ``jobs > 1`` (its blocks chain).
        TrainJobError: when a job failed (raised once every job has ended), naming each failed job, its
            blocks, those left unfinished and its error; the child's traceback is logged at DEBUG level.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return run_training(cfg)
    if cfg.sequential:
        raise ValueError("sequential training feeds each block the outputs of the quantized blocks before it, so "
                         "its blocks cannot be split over jobs; run it with one job")
    plan = plan_jobs(cfg, jobs, DumpManifest.load(cfg.data_dir).num_blocks)
    params = ParamDir(cfg.output_dir)
    everything = [idx for job in plan for idx in job.blocks]
    plan = [job for job in plan if not all(params.is_done(idx, cfg.train_mode) for idx in job.blocks)]
    if not plan or len(everything) == 1:  # nothing left (the param dir is checked here), or one block
        return run_training(cfg)
    root = logging.getLogger()
    level = root.getEffectiveLevel() if root.handlers else None
    log.info("train: %d of %d blocks left, in %d jobs (%s)",
             sum(not params.is_done(idx, cfg.train_mode) for idx in everything), len(everything), len(plan),
             ", ".join(sorted({job.device for job in plan})))
    ctx = get_context("spawn")
    running: dict[Connection, tuple[TrainJob, BaseProcess]] = {}
    failures: list[str] = []
    try:
        with _environment(TQDM_DISABLE="1"):  # one progress view: the children's bars stay off
            for job in plan:
                receive, send = ctx.Pipe(duplex=False)
                child_cfg = dataclasses.replace(cfg, device=job.device)
                process = ctx.Process(target=_run_job, args=(child_cfg, job, send, level), name=job.name,
                                      daemon=True)
                process.start()
                send.close()
                running[receive] = (job, process)
        with tqdm(total=len(everything), desc="train: blocks done", unit="block") as bar:
            while running:
                for conn in wait(list(running), timeout=POLL_SECONDS):
                    job, process = running.pop(conn)
                    failure = _outcome(conn, job, process)
                    if failure:
                        failures.append(_describe(job, failure, params, cfg.train_mode))
                bar.update(sum(params.is_done(idx, cfg.train_mode) for idx in everything) - bar.n)
    finally:
        for conn, (_, process) in running.items():  # only when this process was interrupted
            process.terminate()
            process.join()
            conn.close()
    if failures:
        raise TrainJobError("; ".join(failures) + ". The finished blocks are kept: fix the cause and rerun to "
                            "resume")
    return params


def _outcome(conn: Connection, job: TrainJob, process: BaseProcess) -> dict | None:
    """The failure a finished job reported (None: it succeeded), once its process has exited."""
    try:
        report = conn.recv()
    except EOFError:
        report = None
    finally:
        conn.close()
    process.join()
    if report is None:
        return {"error": f"its process exited with code {process.exitcode} without a report (killed, or out of "
                         "memory?)", "traceback": ""}
    if report["error"] is None:
        return None
    log.debug("%s failed:\n%s", job.name, report["traceback"])
    return report


def _describe(job: TrainJob, failure: dict, params: ParamDir, mode: str) -> str:
    left = [idx for idx in job.blocks if not params.is_done(idx, mode)]
    return (f"{job.name} (blocks {_listing(job.blocks)}; unfinished: {_listing(left) or 'none'}) failed: "
            f"{failure['error']}")


def _listing(blocks: Sequence[int]) -> str:
    return ", ".join(str(idx) for idx in blocks)


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside (spawned children read them at start)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_job(cfg: TrainConfig, job: TrainJob, conn: Connection, level: int | None) -> None:
    """A child process: train ``job``'s share; send ``{"error": None}`` or the error and its traceback."""
    try:
        if level is not None:
            setup_logging(level, prefix=f"{job.name}: ")
        if job.threads is not None:
            torch.set_num_threads(job.threads)
        run_training(cfg, job.ranks)
    except Exception as err:  # reported to the parent, which raises TrainJobError naming this job
        conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    else:
        conn.send({"error": None})
    finally:
        conn.close()
