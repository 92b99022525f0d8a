"""The fault harness: every bad input ends in exit 2 naming its cause, and every stage survives ``kill -9``.

(a) :data:`PROBES`, one table of bad inputs (model folders, text, dumps, param dirs,
    deployed folders, flags, output paths, devices) x the four entry points: exit
    code 2, no traceback, and a message that names the culprit (flag or file) and
    what is wrong. Run in-process for every row; as real processes for a sample (slow).
(b) ``extract_calib_data.py``, ``main.py`` and ``deploy.py`` killed with SIGKILL at
    seeded random points of their writes (early, middle, late) and right after their
    last rename, then rerun: every output file equals an uninterrupted run's (sha256;
    wall times excluded, see :data:`VOLATILE`), and what a kill left is never taken as
    complete (slow).
(c) two ``main.py`` jobs at once on the same block range, and on disjoint ranges: no
    corruption, and the disjoint pair equals one job (slow).

The runs are real processes started through ``tests/e2e/fault_runner.py``, which wraps
the writes' callables to kill the process at the chosen call (the production code
has no test hooks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import deploy as deploy_cli
import eval_ppl
import extract_calib_data
import main as main_cli
from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer
from cores import cli
from cores.calibrator.dump import DumpFiles, HiddenDump, boundary_path
from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.calibrator.params import ParamDir
from cores.calibrator.trainer import TrainConfig, run_training
from cores.deploy import DeployConfig, deploy
from cores.models.deployed import check_deployed_files
from cores.utils.checkpoint import INDEX_NAME
from cores.utils.io import is_temp

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "e2e" / "fault_runner.py"
TEXT = " ".join(f"The {a} {b} of the {c} was {d} in {y}." for a in ("old", "young", "quiet", "bright")
                for b in ("king", "river", "city", "song") for c in ("north", "sea", "hill") for d in ("seen", "kept")
                for y in (1600, 1623))
HIDDEN = 128
ENTRY = {"extract": extract_calib_data, "main": main_cli, "deploy": deploy_cli, "eval": eval_ppl}
SCRIPT = {"extract": "extract_calib_data.py", "main": "main.py", "deploy": "deploy.py", "eval": "eval_ppl.py"}
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs on one torch thread, as the processes
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class World:
    """A tiny bf16 llama (3 blocks, 128 wide, in shards), its text, dump, RTN params and deployed folder,
    and the dump and params of another model of the same architecture."""

    root: Path
    model: Path
    text: Path
    dump: Path
    params: Path
    deployed: Path
    other_dump: Path
    other_params: Path


def _model(path: Path, seed: int) -> Path:
    make_tiny_checkpoint(path, "llama", seed=seed, dtype=torch.bfloat16, hidden_size=HIDDEN, intermediate_size=256,
                         num_hidden_layers=3, vocab_size=300, max_shard_size="100KB")
    save_tiny_tokenizer(path, TEXT, 300)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread) -> World:
    root = tmp_path_factory.mktemp("faults")
    text = root / "text.txt"
    text.write_text(TEXT)
    made = {}
    for name, seed in (("", 0), ("other_", 1)):
        model = _model(root / f"{name}model", seed)
        dump, params = root / f"{name}dump", root / f"{name}params"
        extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=str(text), n_samples=4,
                                          seq_len=16, batch_size=2))
        run_training(TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(params), scheme="w8a8c16",
                                 rtn=True))
        made.update({f"{name}model": model, f"{name}dump": dump, f"{name}params": params})
    deployed = root / "deployed"
    deploy(DeployConfig(str(made["model"]), str(deployed), "w8a8c16", param_dir=str(made["params"]),
                        max_shard_size="100KB"))
    return World(root, made["model"], text, made["dump"], made["params"], deployed, made["other_dump"],
                 made["other_params"])


# ---------------------------------------------------------------- (a) the probe table

@dataclass
class Case:
    """One bad input: flags over the stage's defaults (None drops one, True is a bare flag), and what the
    message must say (a regex naming the culprit and the fault)."""

    flags: dict[str, str | bool | None]
    expect: str
    deny_write: Path | None = None


@dataclass(frozen=True)
class Probe:
    name: str
    stage: str
    build: Callable[[World, Path], Case]
    subprocess: bool = False
    """Also run as a real process (the slow sample)."""


def base_flags(stage: str, w: World, tmp: Path) -> dict[str, str | bool | None]:
    """What each stage runs when nothing is wrong."""
    return {
        "eval": {"--model": w.model, "--dataset": w.text, "--seq_len": "16", "--max_windows": "2"},
        "extract": {"--model": w.model, "--dataset": w.text, "--output_dir": tmp / "dump", "--n_samples": "2",
                    "--seq_len": "16"},
        "main": {"--model": w.model, "--data_dir": w.dump, "--output_dir": tmp / "params", "--scheme": "w8a8c16",
                 "--rtn": True},
        "deploy": {"--input_weight_path": w.model, "--output_weight_path": tmp / "deployed", "--quant_type": "w8a8c16",
                   "--param_dir": w.params},
    }[stage]


def argv(flags: dict) -> list[str]:
    out = []
    for flag, value in flags.items():
        if value is True:
            out.append(flag)
        elif value is not None:
            out += [flag, str(value)]
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard_of(model: Path, key: str) -> Path:
    return model / json.loads((model / INDEX_NAME).read_text())["weight_map"][key]


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def alter_header_dtype(shard: Path, key: str, dtype: str) -> None:
    """Change the dtype that ``shard``'s header states for ``key`` (to one of the same byte size), header size kept."""
    data = shard.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    header[key]["dtype"] = dtype
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= size
    shard.write_bytes(data[:8] + raw + b" " * (size - len(raw)) + data[8 + size:])


def flip_byte(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x55
    path.write_bytes(bytes(data))


def _broken_model(w: World, tmp: Path, edit: Callable[[Path], None]) -> Path:
    model = _copy(w.model, tmp / "model")
    edit(model)
    return model


Q0 = "model.layers.0.self_attn.q_proj.weight"


def _model_probe(name: str, stages: str, edit: Callable[[Path], None], expect: str, sample: str = "") -> list[Probe]:
    """A broken model folder, given to every stage in ``stages`` (``--model`` / ``--input_weight_path``)."""
    out = []
    for stage in stages.split():
        flag = "--input_weight_path" if stage == "deploy" else "--model"
        extra = {"--param_dir": None} if stage == "deploy" else {}  # params are refused as another model's first

        def build(w, tmp, flag=flag, extra=extra):
            return Case({flag: _broken_model(w, tmp, edit), **extra}, expect)

        out.append(Probe(name, stage, build, subprocess=stage in sample.split()))
    return out


def _truncate(model: Path) -> None:
    shard = _shard_of(model, Q0)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _garble_header(model: Path) -> None:
    shard = _shard_of(model, Q0)
    shard.write_bytes(b"\xff" * 64 + shard.read_bytes()[64:])


def _one_bf16_to(dtype: str) -> Callable[[Path], None]:
    return lambda model: alter_header_dtype(_shard_of(model, Q0), Q0, dtype)


def _changed_dump(w: World, tmp: Path, change: Callable[[Path], None], drop_after: int | None = None) -> Path:
    dump = _copy(w.dump, tmp / "dump")
    change(boundary_path(dump, 1))
    if drop_after is not None:
        for i in range(drop_after + 1, 4):
            boundary_path(dump, i).unlink()
    return dump


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _garble(path: Path) -> Path:
    path.write_text("{not json")
    return path.parent


def _flip(path: Path) -> Path:
    flip_byte(path)
    return path.parent


def _drop_block(params: Path, idx: int) -> Path:
    (params / f"block_{idx:03d}.json").unlink()
    return params


def _ro_case(w: World, tmp: Path, stage: str, flag: str, fresh: bool) -> Case:
    """An output under a read-only folder: fresh, its parent is; resumed, what an interrupted run left is (a
    dump without its last boundaries, a param dir without its last block, a deploy's staging folder)."""
    parent = _mkdir(tmp / "ro")
    out = parent / ("ppl.json" if flag == "--output_json" else "out")
    if fresh:
        return Case({flag: out}, rf"{flag} .*/ro/\w+(\.json)?: its folder .*/ro is not writable \(permission "
                                 r"denied or a read-only file system\); choose a writable location", parent)
    if stage == "deploy":
        return Case({flag: out}, r"--output_weight_path \(its staging folder\) .*out\.partial: it is not writable",
                    _mkdir(parent / "out.partial"))
    if stage == "extract":
        for i in (2, 3):
            boundary_path(_copy(w.dump, out) if i == 2 else out, i).unlink()
    elif stage == "main":
        _drop_block(_copy(w.params, out), 2)
    else:
        out.mkdir()
    return Case({flag: out, **({"--n_samples": "4"} if stage == "extract" else {})},
                rf"{flag} .*/ro/out: it is not writable", out)


PROBES: list[Probe] = [
    # ---- model folders
    *_model_probe("truncated shard", "eval extract deploy main", _truncate,
                  r"model-\d+-of-\d+\.safetensors.*truncated or corrupt", sample="eval"),
    *_model_probe("corrupt header", "eval extract", _garble_header,
                  r"header of .*model-\d+-of-\d+\.safetensors.*truncated or corrupt"),
    *_model_probe("missing shard", "eval extract deploy", lambda m: _shard_of(m, Q0).unlink(),
                  r"index.json names shard\(s\) that are not in .*: model-\d+-of-\d+\.safetensors.*fetch the missing"),
    *_model_probe("wrong model_type", "eval extract deploy", lambda m: _edit_config(m, model_type="gpt2"),
                  r"unsupported model_type 'gpt2'; supported: deepseek_v3"),
    *_model_probe("hidden_size 256 on a 128-wide model", "eval extract",
                  lambda m: _edit_config(m, hidden_size=256),
                  r"model\.embed_tokens\.weight in .*model has shape \(300, 128\) but config\.json implies "
                  r"\(300, 256\)", sample="eval extract"),
    *_model_probe("hidden_size 64 on a 128-wide model", "eval extract", lambda m: _edit_config(m, hidden_size=64),
                  r"model\.embed_tokens\.weight in .*model has shape \(300, 128\) but config\.json implies "
                  r"\(300, 64\)"),
    *_model_probe("header dtype BF16 -> F16 (same size)", "eval extract deploy", _one_bf16_to("F16"),
                  r"1 tensor\(s\) are stored as F16 where the checkpoint's 16-bit dtype is BF16 \(config\.json: "
                  r"bfloat16\): 'model\.layers\.0\.self_attn\.q_proj\.weight' \(model-\d+", sample="eval"),
    *_model_probe("header dtype BF16 -> I16 (same size)", "eval", _one_bf16_to("I16"),
                  r"model\.layers\.0\.self_attn\.q_proj\.weight in .* is stored as int16 but the model reads a float"),
    *_model_probe("no config.json", "eval", lambda m: (m / "config.json").unlink(), r"config\.json is missing"),
    *_model_probe("config.json not JSON", "eval", lambda m: (m / "config.json").write_text("{hidden"),
                  r"config\.json is not valid JSON"),
    Probe("model folder missing", "eval", lambda w, tmp: Case({"--model": tmp / "nope"}, r"model folder .*nope does "
                                                                                         r"not exist")),
    # ---- text
    *[Probe(name, stage, lambda w, tmp, content=content, expect=expect: Case(
        {"--dataset": _write(tmp / "t.txt", content)}, expect), subprocess=(stage, name) == ("extract", "binary text"))
      for stage in ("eval", "extract")
      for name, content, expect in (
          ("empty text", b"", r"t\.txt: holds no text"),
          ("short text", b"The old king.", r"--dataset .*t\.txt \(split \w+\) has \d+ tokens, fewer than one "
                                           r"(window|sample) of --seq_len 16"),
          ("binary text", bytes(range(256)) * 8, r"t\.txt: not UTF-8 text"))],
    Probe("dataset missing", "eval", lambda w, tmp: Case({"--dataset": tmp / "none.txt"},
                                                         r"none\.txt: no such file or folder")),
    # ---- dumps and param dirs of other runs, and files changed since they were written
    Probe("dump of another model", "main", lambda w, tmp: Case({"--data_dir": w.other_dump},
                                                               r"other_dump was dumped from another model"),
          subprocess=True),
    Probe("not a dump", "main", lambda w, tmp: Case({"--data_dir": tmp}, r"manifest\.json is missing: .* is not a "
                                                                         r"calibration dump")),
    Probe("dump made with other settings", "extract",
          lambda w, tmp: Case({"--output_dir": w.dump, "--n_samples": "3"}, r"dump made with other settings "
                                                                             r"\(n_samples: 4 != 3")),
    Probe("manifest not JSON", "main", lambda w, tmp: Case(
        {"--data_dir": _garble(_copy(w.dump, tmp / "d") / "manifest.json")}, r"cannot read .*manifest\.json")),
    Probe("dump file changed (same size)", "main", lambda w, tmp: Case(
        {"--data_dir": _changed_dump(w, tmp, flip_byte)},
        r"hidden_001\.safetensors its contents changed since it was written \(sha256 differs\).*rerun "
        r"extract_calib_data\.py"), subprocess=True),
    Probe("dump file truncated, resumed", "extract", lambda w, tmp: Case(
        {"--output_dir": _changed_dump(w, tmp, lambda p: p.write_bytes(p.read_bytes()[:-64]), drop_after=1),
         "--n_samples": "4", "--batch_size": "2"},
        r"hidden_001\.safetensors has \d+ bytes, \d+ when it was written")),
    Probe("params of another model", "eval", lambda w, tmp: Case({"--param_dir": w.other_params},
                                                                 r"other_params was trained on another model")),
    Probe("params of another model", "deploy", lambda w, tmp: Case({"--param_dir": w.other_params},
                                                                   r"other_params was trained on another model")),
    Probe("param dir of another run", "main", lambda w, tmp: Case(
        {"--output_dir": w.params, "--scheme": "w8a8c8"}, r"params holds block params of another run \(scheme")),
    Probe("param dir missing blocks", "eval", lambda w, tmp: Case(
        {"--param_dir": _drop_block(_copy(w.params, tmp / "p"), 1)}, r"p has no block params for blocks 1; run main")),
    Probe("not a param dir", "eval", lambda w, tmp: Case({"--param_dir": tmp}, r"run\.json is missing")),
    Probe("run.json not JSON", "eval", lambda w, tmp: Case(
        {"--param_dir": _garble(_copy(w.params, tmp / "p") / "run.json")}, r"cannot read .*p/run\.json")),
    Probe("params file changed (same size)", "eval", lambda w, tmp: Case(
        {"--param_dir": _flip(_copy(w.params, tmp / "p") / "block_001.safetensors")},
        r"block_001\.safetensors its contents changed .* as block_001\.json records it"), subprocess=True),
    Probe("deployed shard changed (same size)", "eval", lambda w, tmp: Case(
        {"--model": _flip(sorted(_copy(w.deployed, tmp / "dep").glob("*.safetensors"))[1])},
        r"model-00002-of-\d+\.safetensors its contents changed .* as deploy_report\.json records it")),
    # ---- flags out of range
    *[Probe(f"{flag} {value}", stage, lambda w, tmp, flag=flag, value=value, expect=expect: Case(
        {flag: value}, expect), subprocess=(stage, flag) == ("eval", "--seq_len"))
      for stage, flag, value, expect in (
          ("eval", "--seq_len", "1", r"argument --seq_len: must be at least 2, got 1"),
          ("eval", "--max_windows", "0", r"argument --max_windows: must be at least 1, got 0"),
          ("eval", "--batch_size", "0", r"argument --batch_size: must be at least 1, got 0"),
          ("extract", "--n_samples", "0", r"argument --n_samples: must be at least 1, got 0"),
          ("extract", "--batch_size", "0", r"argument --batch_size: must be at least 1, got 0"),
          ("main", "--epochs", "-1", r"argument --epochs/--epoch: must be at least 0, got -1"),
          ("main", "--batch_size", "0", r"argument --batch_size/--cali_bsz: must be at least 1, got 0"),
          ("main", "--end_block_idx", "0", r"argument --end_block_idx: must be at least 1, got 0"),
          ("deploy", "--verify_samples", "0", r"argument --verify_samples: must be at least 1, got 0"),
          ("deploy", "--max_shard_size", "5XB", r"--max_shard_size '5XB' is not a size"),
          ("deploy", "--quant_type", "w3a8c8", r"unknown quant_type 'w3a8c8'; valid: bfloat16"))],
    Probe("--start_block_idx 2 --end_block_idx 2", "main", lambda w, tmp: Case(
        {"--start_block_idx": "2", "--end_block_idx": "2"},
        r"empty block range \[--start_block_idx 2, --end_block_idx 2")),
    # ---- output paths of the wrong kind
    Probe("--output_dir is a file", "extract", lambda w, tmp: Case({"--output_dir": _write(tmp / "f", b"x")},
                                                                   r"--output_dir .*/f is a file, not a folder"),
          subprocess=True),
    Probe("--output_dir under a file", "extract", lambda w, tmp: Case(
        {"--output_dir": _write(tmp / "f", b"x") / "dump"}, r"--output_dir .*f/dump: .*/f is a file, so")),
    Probe("--output_dir is a file", "main", lambda w, tmp: Case({"--output_dir": _write(tmp / "f", b"x")},
                                                                r"--output_dir .*/f is a file, not a folder")),
    Probe("--output_weight_path is a file, --overwrite", "deploy", lambda w, tmp: Case(
        {"--output_weight_path": _write(tmp / "f", b"x"), "--overwrite": True},
        r"--output_weight_path .*/f is a file, not a folder \(--overwrite replaces a folder only\)"), subprocess=True),
    Probe("--output_weight_path is a file", "deploy", lambda w, tmp: Case(
        {"--output_weight_path": _write(tmp / "f", b"x")}, r"--output_weight_path .*/f is a file, not a folder")),
    Probe("--output_weight_path exists", "deploy", lambda w, tmp: Case(
        {"--output_weight_path": _mkdir(tmp / "old")}, r"old exists; pass --overwrite to replace it")),
    Probe("--output_json is a folder", "eval", lambda w, tmp: Case({"--output_json": tmp},
                                                                   r"--output_json .* is a folder; give the name of a "
                                                                   r"file"), subprocess=True),
    Probe("--output_json under a file", "eval", lambda w, tmp: Case(
        {"--output_json": _write(tmp / "f", b"x") / "ppl.json"}, r"--output_json .*f/ppl\.json: .*/f is a file, so")),
    Probe("--offload_dir is a file", "eval", lambda w, tmp: Case({"--offload_dir": _write(tmp / "f", b"x")},
                                                                 r"--offload_dir .*/f is a file, not a folder")),
    # ---- read-only output folders, fresh and resumed
    *[Probe(f"read-only {flag}, {'fresh' if fresh else 'resumed'}", stage,
            lambda w, tmp, stage=stage, flag=flag, fresh=fresh: _ro_case(w, tmp, stage, flag, fresh),
            subprocess=(stage, fresh) in (("main", False), ("deploy", True)))
      for stage, flag in (("extract", "--output_dir"), ("main", "--output_dir"), ("deploy", "--output_weight_path"),
                          ("eval", "--output_json"), ("eval", "--offload_dir"))
      for fresh in (True, False) if not (flag == "--output_json" and not fresh)],
    # ---- devices
    *[Probe(f"--dev {dev}", stage, lambda w, tmp, dev=dev, expect=expect: Case({"--dev": dev}, expect),
            subprocess=(stage, dev) == ("main", "0"))
      for stage in ("eval", "extract", "main")
      for dev, expect in (("cuda:0", r"--dev cuda:0: torch .* finds no CUDA device on this machine; use --dev cpu"),
                          ("foo", r"--dev 'foo' is not a device: use cpu, cuda, cuda:N or N"))],
    Probe("--dev 0", "main", lambda w, tmp: Case({"--dev": "0"},
                                                 r"--dev 0 \(= cuda:0\): torch .* finds no CUDA device"),
          subprocess=True),
]


def _ids(probes):
    return [f"{p.stage}: {p.name}" for p in probes]


def _deny(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only for this process: by its mode bits when they bind (not root), else by
    ``os.access`` (root writes whatever the mode says; a probe file would still succeed)."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and Path(p) == folder
                            else real(p, mode, *a, **k))


def _skipped_here(probe: Probe) -> bool:
    """The probes that ask for CUDA fail only where there is none: skipped on a machine with a GPU."""
    return ("cuda" in probe.name or probe.name == "--dev 0") and torch.cuda.is_available()


@pytest.mark.parametrize("probe", PROBES, ids=_ids(PROBES))
def test_probe_exits_2_naming_the_culprit(world, probe, tmp_path, monkeypatch, capsys, caplog):
    if _skipped_here(probe):
        pytest.skip("the probe is about a machine without CUDA")
    case = probe.build(world, tmp_path)
    flags = {**base_flags(probe.stage, world, tmp_path), **case.flags}
    if case.deny_write is not None:
        _deny(monkeypatch, case.deny_write)
    try:
        with caplog.at_level(logging.INFO):
            rc = ENTRY[probe.stage].main(argv(flags))
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    finally:
        if case.deny_write is not None:
            case.deny_write.chmod(0o755)
    captured = capsys.readouterr()
    text = caplog.text + captured.err + captured.out
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text
    assert re.search(case.expect, text), text[-3000:]
    message = next(m[1] for line in text.splitlines() if (m := re.search(r"(?:ERROR +\S+:\d+ |error: )(.*)", line)))
    print(f"PROBE | {probe.stage} | {probe.name} | {rc} | {message}")


SAMPLE = [p for p in PROBES if p.subprocess]
LANES = 2
"""Processes the slow tests run at once (the machine has 2 cores; each process runs one torch thread)."""


def in_lanes(fn: Callable, items: list) -> list:
    """``fn`` of every item, :data:`LANES` at a time (each item a separate process or chain of processes)."""
    with ThreadPoolExecutor(LANES) as pool:
        return list(pool.map(fn, items))


@pytest.mark.slow
def test_probes_as_processes(world, tmp_path):
    """A sample of the table as real processes: exit code 2, no traceback on stderr, the culprit named."""

    def run(probe: Probe) -> str:
        if _skipped_here(probe):
            return f"{probe.stage}: {probe.name}: skipped (CUDA present)"
        tmp = tmp_path / f"{probe.stage}-{re.sub(r'[^A-Za-z0-9]+', '_', probe.name)}"
        tmp.mkdir()
        case = probe.build(world, tmp)
        flags = {**base_flags(probe.stage, world, tmp), **case.flags}
        runner = ["--deny_write", str(case.deny_write)] if case.deny_write else []
        proc = subprocess.run([sys.executable, str(RUNNER), *runner, "--", SCRIPT[probe.stage], *argv(flags)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        ok = proc.returncode == 2 and "Traceback" not in proc.stderr and re.search(case.expect, proc.stderr)
        failed = "" if ok else f" FAILED\n{proc.stderr[-2000:]}"
        return f"{probe.stage}: {probe.name}: exit {proc.returncode}{failed}"

    results = in_lanes(run, SAMPLE)
    print("\n".join(results))
    assert not [r for r in results if "FAILED" in r], "\n".join(r for r in results if "FAILED" in r)


def test_writability_check_sees_a_read_only_file_system(tmp_path, monkeypatch):
    """The probe file catches what ``os.access`` lets pass (some network and FUSE file systems)."""
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "touch", refuse)
    with pytest.raises(cli.UsageError, match="is not writable"):
        cli.check_output_dir("--output_dir", tmp_path)


# ---------------------------------------------------------------- (b) kill -9 and rerun

VOLATILE = {"block_": ("seconds",), "deploy_report.json": ("seconds",)}
"""JSON fields that hold wall time, the only outputs that differ between runs by nature: a block record's
``seconds`` (main.py) and the deploy report's ``seconds``. Everything else is compared byte for byte."""

EVENTS = {
    "extract": "os:replace,os:fsync,cores.models.hidden_store:HiddenStore.read",
    "main": "os:replace,os:fsync,cores.calibrator.fit:Batches.get",
    "deploy": "os:replace,os:fsync,cores.utils.safetensors_stream:_pwrite_all",
}
"""What the kill points are drawn from: renames, fsyncs (a file complete under its temporary name), and the
stage's unit of work (a batch of rows read while a boundary streams out; a batch of a training step; a
piece of a shard written)."""


def stage_argv(stage: str, w: World, out: Path) -> list[str]:
    return {
        "extract": ["--model", w.model, "--dataset", w.text, "--output_dir", out, "--n_samples", "4", "--seq_len",
                    "16", "--batch_size", "2"],
        "main": ["--model", w.model, "--data_dir", w.dump, "--output_dir", out, "--scheme", "w8a8c8", "--epochs", "2",
                 "--batch_size", "2"],
        "deploy": ["--input_weight_path", w.model, "--output_weight_path", out, "--quant_type", "w8a8c16",
                   "--param_dir", w.params, "--max_shard_size", "40KB"],
    }[stage]


def run_stage(stage: str, w: World, out: Path, *runner: str) -> subprocess.CompletedProcess:
    """``stage`` on ``w`` into ``out`` as a process, through the runner with its options ``runner``."""
    cmd = [sys.executable, str(RUNNER), *runner, "--", SCRIPT[stage], *map(str, stage_argv(stage, w, out))]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``folder`` (hidden ones included), the JSON files of
    :data:`VOLATILE` without their wall-time fields."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        volatile = next((keys for prefix, keys in VOLATILE.items() if path.name.startswith(prefix)
                         and path.suffix == ".json"), None)
        if volatile:
            doc = json.loads(data)
            data = json.dumps({k: v for k, v in doc.items() if k not in volatile}, sort_keys=True).encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def never_taken_as_complete(stage: str, out: Path) -> None:
    """What a kill left under final names is complete: each stage's own reuse checks accept it."""
    if stage == "extract" and out.is_dir():
        finals = [p for p in out.glob("*.safetensors")]
        if finals:
            files = DumpFiles(out)
            for path in finals:
                files.check(path)  # recorded and unchanged
                if path.name.startswith("hidden_"):
                    dump = HiddenDump(path)
                    assert dump.read(0, len(dump)).shape[0] == 4
    elif stage == "main" and out.is_dir():
        params = ParamDir(out)
        for idx in params.done_blocks():
            params.load_block(idx)  # its record's size and checksum match
    elif stage == "deploy" and out.is_dir():
        assert (out / INDEX_NAME).is_file() and (out / "deploy_report.json").is_file()
        check_deployed_files(out)


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its output folder and the names of its counted calls, in order."""

    out: Path
    names: list[str]


@pytest.fixture(scope="module")
def references(world, tmp_path_factory) -> dict[str, Reference]:
    """An uninterrupted run of each stage, with the sequence of its counted calls."""
    def run(stage: str) -> Reference:
        root = tmp_path_factory.mktemp(f"ref-{stage}")
        count = root / "calls.json"
        proc = run_stage(stage, world, root / "out", "--events", EVENTS[stage], "--count_file", str(count))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return Reference(root / "out", json.loads(count.read_text()))

    stages = ["extract", "main", "deploy"]
    return dict(zip(stages, in_lanes(run, stages)))


def kill_points(stage: str, names: list[str]) -> list[tuple[str, int, str]]:
    """``(label, call number, before|after)``: one call drawn at random in each third of the run (seeded by the
    stage), and the moment right after the last rename."""
    rng = random.Random(f"kill-{stage}")
    n = len(names)
    thirds = (("early", 1, n // 3), ("middle", n // 3 + 1, 2 * n // 3), ("late", 2 * n // 3 + 1, n))
    points = [(label, rng.randint(lo, hi), rng.choice(["before", "after"])) for label, lo, hi in thirds]
    last_rename = max(i for i, name in enumerate(names, 1) if name == "os:replace")
    return [*points, ("after the last rename", last_rename, "after")]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["extract", "main", "deploy"])
def test_kill_9_then_rerun_gives_the_same_bytes(world, references, stage, tmp_path):
    ref = references[stage]
    expected = snapshot(ref.out)
    assert expected and not [p for p in expected if is_temp(p)]

    def kill_and_rerun(point: tuple[str, int, str]) -> str:
        label, at, when = point
        what = f"{stage}: {label}, call {at}/{len(ref.names)} {when} {ref.names[at - 1]}"
        out = tmp_path / f"{label.replace(' ', '_')}-{at}"
        killed = run_stage(stage, world, out, "--events", EVENTS[stage], "--kill_at", str(at), "--kill_when", when)
        assert killed.returncode == -signal.SIGKILL, f"{what}: not killed: {killed.stderr[-2000:]}"
        never_taken_as_complete(stage, out)
        rerun = run_stage(stage, world, out)
        assert rerun.returncode == 0, f"{what}: rerun failed: {rerun.stderr[-3000:]}"
        assert snapshot(out) == expected, f"{what}: the rerun's output differs from an uninterrupted run's"
        return f"{what}: resumed, identical"

    print("\n".join(in_lanes(kill_and_rerun, kill_points(stage, ref.names))))


@pytest.mark.slow
def test_kill_9_at_a_random_time(world, references, tmp_path):
    """SIGKILL from outside at a seeded random time after the first output appears; then rerun: same bytes."""
    rng = random.Random("kill-time")
    delays = {stage: rng.uniform(0, 0.5) for stage in ("extract", "main", "deploy")}

    def kill_and_rerun(stage: str) -> str:
        out = tmp_path / stage
        marker = {"extract": out / "tokens.safetensors", "main": out / "run.json",
                  "deploy": out.with_name(out.name + ".partial")}[stage]
        cmd = [sys.executable, str(RUNNER), "--", SCRIPT[stage], *map(str, stage_argv(stage, world, out))]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delays[stage])
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait()
        never_taken_as_complete(stage, out)
        rerun = run_stage(stage, world, out)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert snapshot(out) == snapshot(references[stage].out), stage
        return (f"{stage}: SIGKILL {delays[stage]:.3f} s after {marker.name} appeared "
                f"({'killed' if rc < 0 else 'it had finished'}): resumed, identical")

    print("\n".join(in_lanes(kill_and_rerun, list(delays))))


# ---------------------------------------------------------------- (c) concurrent main.py jobs

@pytest.mark.slow
def test_concurrent_jobs_on_one_param_dir(world, references, tmp_path):
    expected = snapshot(references["main"].out)
    for name, ranges in (("same range", [(), ()]), ("disjoint ranges", [("--end_block_idx", "2"),
                                                                         ("--start_block_idx", "2")])):
        out = tmp_path / name.replace(" ", "_")
        procs = [subprocess.Popen([sys.executable, str(RUNNER), "--", "main.py",
                                   *map(str, stage_argv("main", world, out)), *extra], cwd=ROOT, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for extra in ranges]
        errs = []
        for proc in procs:
            errs.append(proc.communicate(timeout=300)[1])
            assert proc.returncode == 0, errs[-1][-3000:]
        params = ParamDir(out)
        for idx in params.done_blocks():
            params.load_block(idx)
        assert snapshot(out) == expected, name
        kept = sum(err.count("was finished by another job meanwhile") for err in errs)
        print(f"main.py x2, {name}: equal to one job; {kept} block(s) finished by both, the first one's kept")


# ---------------------------------------------------------------- the pieces the harness relies on

def test_device_check_on_a_machine_with_two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [cli.check_device("--dev", d) for d in ("cpu", "cuda", "cuda:1", "1", None)] == \
        ["cpu", "cuda", "cuda:1", "cuda:1", None]
    with pytest.raises(cli.UsageError, match=r"--dev 2 \(= cuda:2\): this machine has 2 CUDA device\(s\), cuda:0 to "
                                             r"cuda:1"):
        cli.check_device("--dev", "2")
    with pytest.raises(cli.UsageError, match="--dev 'mps' is not a device"):
        cli.check_device("--dev", "mps")


def test_large_files_are_checked_on_samples(tmp_path, monkeypatch):
    from cores.utils import io

    monkeypatch.setattr(io, "FULL_DIGEST_BYTES", 1 << 20)
    path, data = tmp_path / "big.bin", os.urandom(5 << 20)
    path.write_bytes(data)
    record = io.file_record(path)
    assert record["digest"].startswith("sha256-sampled:") and io.file_change(path, record) is None
    flip_byte(path, offset_from_end=(5 << 20) - 100)  # in the first MiB, where a header lives
    assert "contents changed" in io.file_change(path, record)
    path.write_bytes(data[:-1])
    assert io.file_change(path, record) == f"has {(5 << 20) - 1} bytes, {5 << 20} when it was written"
    path.write_bytes(data)
    monkeypatch.setattr(io, "FULL_DIGEST_BYTES", 64 << 20)  # a record is checked by the method it was made with
    assert io.file_change(path, record) is None


def test_stale_temporary_files_of_dead_processes_go(tmp_path):
    from cores.utils import io

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours, theirs = io.temp_path(tmp_path / "a.json"), io.temp_path(tmp_path / "b.json")
    theirs = theirs.with_name(theirs.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    other_host = tmp_path / f".c.json.otherhost-{dead.pid}-0123abcd.tmp"
    for path in (ours, theirs, other_host):
        path.write_text("x")
    assert all(io.is_temp(p) for p in (ours, theirs, other_host))
    assert io.remove_stale_temps(tmp_path) == [theirs]
    assert ours.exists() and other_host.exists()


def test_a_block_finished_by_another_job_meanwhile_is_kept(world, tmp_path):
    params = ParamDir(_copy(world.params, tmp_path / "p"))
    theirs = params.load_block(0)
    (params.record_path(0)).unlink()
    assert params.save_block(0, theirs, {"block": 0})
    ours = {k: v + 1 for k, v in theirs.items()}
    assert not params.save_block(0, ours, {"block": 0, "mine": True})  # the other job was first: its pair stays
    kept = params.load_block(0)
    assert all(torch.equal(kept[k], theirs[k]) for k in theirs) and "mine" not in params.records()[0]
    assert not [p for p in params.path.iterdir() if is_temp(p)]


def test_outputs_of_older_versions_load_unchecked_with_a_warning(world, tmp_path, caplog):
    from cores.models.streaming import StreamingModel

    dump = _copy(world.dump, tmp_path / "dump")
    manifest = json.loads((dump / "manifest.json").read_text())
    del manifest["files"]
    (dump / "manifest.json").write_text(json.dumps(manifest))
    params = _copy(world.params, tmp_path / "params")
    for record in params.glob("block_*.json"):
        record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "params_file"}))
    deployed = _copy(world.deployed, tmp_path / "deployed")
    report = json.loads((deployed / "deploy_report.json").read_text())
    del report["files"]
    (deployed / "deploy_report.json").write_text(json.dumps(report))
    with caplog.at_level(logging.WARNING):
        run_training(TrainConfig(model=str(world.model), data_dir=str(dump), output_dir=str(tmp_path / "p2"),
                                 scheme="w8a8c16", rtn=True, end_block_idx=1))
        ParamDir(params).load_block(0)
        StreamingModel(deployed).load_block(0)
        extract_calibration(ExtractConfig(model=str(world.model), output_dir=str(dump), dataset=str(world.text),
                                          n_samples=4, seq_len=16, batch_size=2))  # complete: records what is there
    assert "manifest.json records no file checksums" in caplog.text
    assert "block records without params_file" in caplog.text
    assert "deploy_report.json records no file checksums" in caplog.text
    assert set(json.loads((dump / "manifest.json").read_text())["files"]) == {
        "tokens.safetensors", *(f"hidden_{i:03d}.safetensors" for i in range(4))}


def test_deploy_rerun_after_completion_has_nothing_to_do(world, tmp_path, caplog):
    cfg = DeployConfig(str(world.model), str(world.deployed), "w8a8c16", param_dir=str(world.params),
                       max_shard_size="100KB")
    before = snapshot(world.deployed)
    with caplog.at_level(logging.INFO):
        result = deploy(cfg)
    assert "is this deploy already" in caplog.text and result.verify["FAIL"] == 0 and result.shards > 2
    assert snapshot(world.deployed) == before
