"""A deployed SmolLM2 checkpoint served by a real engine: vLLM's CPU build (opt-in, ``-m vllm``).

Needs ``.venv-vllm`` (``bash scripts/setup_vllm.sh``, a few minutes, ~3.6 GB); skipped without it.
Deploys SmolLM2-135M round-to-nearest as W8A8 with dynamic per-token activations and a 16-bit KV
cache, and compares vLLM's perplexity (``scripts/check_serving.py``: ``prompt_logprobs`` on token-id
prompts) with our ``eval_ppl.py`` on the deployed folder, on the same 16 windows of 512 tokens; the
same for the ``--quant_type fp8`` (128x128 block) checkpoint on 4 windows of 256 tokens; and a recipe's
per-target overrides (two config groups, ``down_proj`` static) with two layers restored to BF16, on
vLLM's oneDNN int8 path (its AMX sgl path ignores static input scales), and static activations with
a zero point there too; all in bfloat16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("BLOCKPTQ_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
"""The vLLM venv's interpreter (``BLOCKPTQ_VLLM_PYTHON`` names another one, e.g. a worktree's main checkout's)."""
SEQ_LEN, WINDOWS = 256, 4
TOLERANCE = 0.005  # 0.5 %


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM venv's interpreter, or a skip saying how to make it."""
    reason = "no vLLM venv at .venv-vllm: run bash scripts/setup_vllm.sh"
    if not VLLM_PYTHON.is_file():
        pytest.skip(reason)
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode:
        pytest.skip(f"{reason} (import vllm failed: {probe.stderr.strip().splitlines()[-1:]})")
    return VLLM_PYTHON


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=1800)


W8A8_SEQ_LEN, W8A8_WINDOWS = 512, 16
W8A8_TOLERANCE = 0.01  # 1 %: measured -0.27 % (bf16, 16 x 512); bf16 rounding flips alone move 4 x 256 by 2 %


def test_vllm_ppl_matches_ours_on_deployed_w8a8(assets, vllm_python, tmp_path):
    """W8A8 int8 with dynamic per-token activations, served by ``CompressedTensorsW8A8Int8`` on
    ``CPUInt8ScaledMMLinearKernel``, against our ``eval_ppl.py``, both in bfloat16.

    bfloat16 because on a CPU with AMX vLLM 0.32 runs these linears through the sgl kernel
    ``int8_scaled_mm_with_quant``, which refuses float32 ("expect A to be bfloat16 or half"); without AMX
    it takes oneDNN, which runs both. Measured on 16 x 512 tokens (AMX, sgl): vLLM 33.7903 vs ours
    33.8807 (-0.27 %). On 4 x 256 tokens bf16 is too coarse to compare: vLLM 55.0040 (oneDNN 54.9115) vs
    ours 56.2509 (-2.2 %), the unquantized model there -0.44 % (vLLM 54.0788 vs ours 54.3159), while in
    float32 (oneDNN, forced) the same checkpoint gave vLLM 56.0854 vs ours 56.0943 (-0.02 %)."""
    deployed = tmp_path / "smollm2-w8a8c16"
    done = run([sys.executable, "deploy.py", "--input_weight_path", assets.model_dir, "--output_weight_path", deployed,
                "--quant_type", "w8a8c16"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    eval_args = ["--dataset", assets.eval_text, "--seq_len", W8A8_SEQ_LEN, "--max_windows", W8A8_WINDOWS,
                 "--dtype", "bfloat16"]

    ours_json = tmp_path / "ours.json"
    done = run([sys.executable, "eval_ppl.py", "--model", deployed, *eval_args, "--output_json", ours_json])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    vllm_json = tmp_path / "vllm.json"
    done = run([vllm_python, "scripts/check_serving.py", "--model", deployed, *eval_args, "--output_json", vllm_json])
    served = json.loads(vllm_json.read_text()) if vllm_json.is_file() else {}
    assert done.returncode == 0 and "refused" not in served, \
        served.get("refused") or (done.stdout[-2000:] + done.stderr[-3000:])

    ours = json.loads(ours_json.read_text())
    assert served["tokens"] == ours["tokens"] == W8A8_WINDOWS * (W8A8_SEQ_LEN - 1)
    assert ours["dtype"] == "bfloat16" and served["served_dtype"] == "torch.bfloat16", (ours["dtype"], served)
    int8 = {what: n for what, n in served["schemes"].items() if "CompressedTensorsW8A8Int8" in what}
    assert sum(int8.values()) == 120 and all("CPUInt8ScaledMMLinearKernel" in what for what in int8), served["schemes"]
    assert served["kv_cache_dtype_used"] == "auto"
    diff = served["ppl"] / ours["ppl"] - 1
    print(f"vLLM {served['vllm_version']} ppl {served['ppl']:.4f}, ours {ours['ppl']:.4f} ({diff:+.3%}; {int8})")
    assert abs(diff) < W8A8_TOLERANCE, f"vLLM ppl {served['ppl']:.4f} vs ours {ours['ppl']:.4f} ({diff:+.3%})"


def test_vllm_serves_the_fp8_block_checkpoint_as_our_loader_reads_it(assets, vllm_python, tmp_path):
    """``--quant_type fp8`` (e4m3 weights, 128x128 ``weight_scale_inv``): vLLM's ``Fp8LinearMethod`` (CPU:
    ``CPUFp8BlockScaledMMKernel``, bf16 activations) against our ``eval_ppl.py`` on the same windows, both in
    bfloat16 (vLLM refuses float32 for fp8: "torch.float32 is not supported for quantization method fp8").
    SmolLM2's q_proj (576 rows) is off the 128-row grid, so q/k/v stay bf16 (vLLM merges them); measured
    vLLM 55.1121 vs ours 55.1461 (-0.06 %) on 4 x 256 tokens."""
    deployed = tmp_path / "smollm2-fp8"
    done = run([sys.executable, "deploy.py", "--input_weight_path", assets.model_dir, "--output_weight_path", deployed,
                "--quant_type", "fp8"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    eval_args = ["--dataset", assets.eval_text, "--seq_len", SEQ_LEN, "--max_windows", WINDOWS]
    ours_json, vllm_json = tmp_path / "ours.json", tmp_path / "vllm.json"
    done = run([sys.executable, "eval_ppl.py", "--model", deployed, *eval_args, "--dtype", "bfloat16",
                "--output_json", ours_json])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    done = run([vllm_python, "scripts/check_serving.py", "--model", deployed, *eval_args, "--dtype", "bfloat16",
                "--output_json", vllm_json])
    served = json.loads(vllm_json.read_text()) if vllm_json.is_file() else {}
    assert done.returncode == 0 and "refused" not in served, \
        served.get("refused") or (done.stdout[-2000:] + done.stderr[-3000:])
    ours = json.loads(ours_json.read_text())
    assert served["tokens"] == ours["tokens"] == WINDOWS * (SEQ_LEN - 1)
    assert served["quantization"] == "fp8" and served["schemes"].get("Fp8LinearMethod") == 90, served["schemes"]
    diff = served["ppl"] / ours["ppl"] - 1
    print(f"vLLM {served['vllm_version']} fp8 ppl {served['ppl']:.4f}, ours {ours['ppl']:.4f} ({diff:+.3%})")
    assert abs(diff) < TOLERANCE, f"vLLM ppl {served['ppl']:.4f} vs ours {ours['ppl']:.4f} ({diff:+.3%})"


MIXED_RECIPE = """\
version: 1
scheme: w8a8c16
options: {act: dynamic}
ignore: [lm_head]
overrides:
  - targets: ['re:.*down_proj$']
    act: static
bf16_layers: ['28-29']
training: {rtn: true}
"""


def _serve_and_compare(model: Path, vllm_python: Path, eval_args: list, tmp_path: Path, name: str,
                       serve_args: tuple = (), tolerance: float = TOLERANCE) -> dict:
    ours_json, vllm_json = tmp_path / f"ours-{name}.json", tmp_path / f"vllm-{name}.json"
    done = run([sys.executable, "eval_ppl.py", "--model", model, *eval_args, "--output_json", ours_json])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    done = run([vllm_python, "scripts/check_serving.py", "--model", model, *eval_args, *serve_args,
                "--output_json", vllm_json])
    served = json.loads(vllm_json.read_text()) if vllm_json.is_file() else {}
    assert done.returncode == 0 and "refused" not in served, \
        served.get("refused") or (done.stdout[-2000:] + done.stderr[-3000:])
    ours = json.loads(ours_json.read_text())
    assert served["tokens"] == ours["tokens"] == WINDOWS * (SEQ_LEN - 1)
    diff = served["ppl"] / ours["ppl"] - 1
    print(f"{name}: vLLM {served['vllm_version']} ppl {served['ppl']:.4f}, ours {ours['ppl']:.4f} ({diff:+.3%})")
    assert abs(diff) < tolerance, f"{name}: vLLM ppl {served['ppl']:.4f} vs ours {ours['ppl']:.4f} ({diff:+.3%})"
    return served


STATIC_TOLERANCE = 0.05
"""5 %: static per-tensor down_proj on SmolLM2 swings vLLM against ours by 2-3 % either way on 4 x 256 tokens
(measured, oneDNN: bf16 +2.5 % and -3.0 %, float32 -2.1 %; README's static row +2.3 % on 16 x 512 in float32),
where vLLM serving the group as dynamic (the sgl path) lands at -49 %."""


def test_vllm_serves_per_target_groups_and_bf16_layers(assets, vllm_python, tmp_path):
    """A recipe with ``down_proj`` static (its own config group) over dynamic W8A8, and layers 28-29 restored
    to BF16 (``cores.recipes.mixed``): vLLM serves both checkpoints as our loader computes them, in bfloat16.

    With ``--int8_kernel onednn``: on an AMX CPU vLLM 0.32 otherwise runs every int8 linear on the sgl kernel,
    which ignores the static input scales (``_apply_weights_sgl`` in
    ``vllm/model_executor/kernels/linear/scaled_mm/cpu.py``) and so serves the checkpoint as all-dynamic:
    ppl 55.00 against our 108.01. Measured on 4 x 256 tokens with oneDNN: two groups vLLM 110.73 vs ours
    108.01 (+2.5 %; float32 108.19 vs 110.52, -2.1 %); with layers 28-29 in BF16 vLLM 86.18 vs ours 88.87
    (-3.0 %)."""
    from cores.recipes.flow import FlowConfig, run_flow

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(MIXED_RECIPE)
    out = run_flow(FlowConfig(model_path=str(assets.model_dir), save_path=str(tmp_path / "run"), recipe=str(recipe),
                              calib_dataset=str(assets.train_text), n_samples=4, seq_len=256))
    eval_args = ["--dataset", assets.eval_text, "--seq_len", SEQ_LEN, "--max_windows", WINDOWS, "--dtype", "bfloat16"]
    for name, folder, int8_linears in (("two groups", out["deployed"], 30 * 4),
                                       ("two groups + bf16 28-29", out["mixed"], 28 * 4)):
        served = _serve_and_compare(Path(folder), vllm_python, eval_args, tmp_path, name,
                                    serve_args=("--int8_kernel", "onednn"), tolerance=STATIC_TOLERANCE)
        assert sum(n for what, n in served["schemes"].items() if "CompressedTensorsW8A8Int8" in what) == int8_linears
        static = [layer for layer, e in served["layers"].items() if e.get("static_input")]
        assert len(static) == int8_linears // 4 and all(layer.endswith("down_proj") for layer in static), static
        assert served["int8_kernel_paths"] == ["onednn"], served["schemes"]
        assert not served["ignored_static_input_scales"], served["ignored_static_input_scales"]


ZERO_POINT_RECIPE = """\
version: 1
scheme: w8a8c16
options: {act: static, act_zero_point: true}
ignore: [lm_head]
training: {rtn: true}
"""


def test_vllm_serves_asymmetric_static_activations(assets, vllm_python, tmp_path):
    """Static int8 activations with a zero point (``input_zero_point``, ``symmetric: false``) on every linear:
    vLLM's ``CompressedTensorsW8A8Int8`` runs them with its azp path (oneDNN) as our loader computes them. A
    zero point vLLM ignored would shift every activation by ~100 codes, far outside the tolerance. Measured
    here (4 x 256 calibration, 4 x 256 eval tokens, bfloat16): vLLM 98.7339 vs ours 95.2153 (+3.7 %, the
    static swing of :data:`STATIC_TOLERANCE`); on the bench's 64 x 512 RTN calibration, 8 x 512 eval tokens,
    float32: vLLM 81.5660 vs ours 80.7064 (+1.07 %)."""
    from cores.recipes.flow import FlowConfig, run_flow

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(ZERO_POINT_RECIPE)
    out = run_flow(FlowConfig(model_path=str(assets.model_dir), save_path=str(tmp_path / "run"), recipe=str(recipe),
                              calib_dataset=str(assets.train_text), n_samples=4, seq_len=256))
    config = json.loads((Path(out["deployed"]) / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["symmetric"] is False
    eval_args = ["--dataset", assets.eval_text, "--seq_len", SEQ_LEN, "--max_windows", WINDOWS, "--dtype", "bfloat16"]
    served = _serve_and_compare(Path(out["deployed"]), vllm_python, eval_args, tmp_path, "zero point",
                                serve_args=("--int8_kernel", "onednn"), tolerance=STATIC_TOLERANCE)
    static = [layer for layer, e in served["layers"].items() if e.get("static_input")]
    assert len(static) == 30 * 4 and served["int8_kernel_paths"] == ["onednn"], served["schemes"]
    assert not served["ignored_static_input_scales"], served["ignored_static_input_scales"]
