"""The five commands: thin top-level scripts over ``cores.cli``, the same mains as the installed console scripts."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
