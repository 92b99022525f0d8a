"""The five commands: thin top-level scripts over ``cores.cli``, the same mains as the installed console scripts."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"blockptq-extract": "extract_calib_data", "blockptq-train": "main", "blockptq-deploy": "deploy",
           "blockptq-eval": "eval_ppl", "blockptq-quantize": "quantize"}


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_is_the_top_level_scripts_main():
    scripts = console_scripts()
    assert set(scripts) == set(SCRIPTS)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module.startswith("cores.cli.") and attr == "main", target
        assert getattr(importlib.import_module(module), attr) is importlib.import_module(SCRIPTS[name]).main


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_installed_console_script_runs(name, tmp_path):
    """``bash scripts/setup_env.sh`` installs them next to the venv's python."""
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"{exe} is missing: rerun bash scripts/setup_env.sh (pip install -e .)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {name}"), out.stderr
    bad = subprocess.run([str(exe), "--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "missing.yaml does not exist" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr


def test_main_py_maps_its_flags_onto_the_train_config(tmp_path):
    """``main.py``'s flags go through ``config_from_args`` like the other commands': defaults < ``--config`` < flags
    (aliases included), the seed spellings resolved into ``--scheme``, ``--dev N`` checked into ``cuda:N`` or
    ``cpu``; ``--dtype`` takes float32 or bfloat16 only."""
    import main

    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nlr: 0.5\nbatch_size: 4\ndtype: bfloat16\n")
    common = ["--model", "m", "--data_dir", "d", "--output_dir", str(tmp_path / "o")]
    cfg, _ = main.parse_args(["--config", str(config), *common, "--epoch", "7", "--cali_bsz", "2", "--w_bits", "4",
                              "--a_bits", "8", "--cls", "c8", "--q_bits", "8", "--k_bits", "8", "--v_bits", "8",
                              "--dev", "cpu"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.dtype, cfg.scheme, cfg.device) == (7, 0.5, 2, "bfloat16",
                                                                                      "w4a8c8", "cpu")
    cfg, _ = main.parse_args([*common, "--dtype", "float32"])
    assert (cfg.epochs, cfg.dtype, cfg.scheme, cfg.device) == (5, "float32", "w8a8c8", "cpu")
    with pytest.raises(SystemExit):
        main.parse_args([*common, "--dtype", "float16"])
    with pytest.raises(SystemExit):
        main.parse_args([*common, "--scheme", "w8a8c16", "--w_bits", "4"])
