"""Dump -> train -> fake-quant eval on a tiny model: resumability, refusals, and learned <= RTN."""

import json
import math

import pytest
import torch

import eval_ppl
import extract_calib_data
import main as main_cli
from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer
from cores.calibrator.dump import DumpError, DumpFiles, DumpManifest, HiddenDump, boundary_path
from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.calibrator.params import ParamDir, ParamDirError
from cores.calibrator.trainer import TrainConfig, run_training
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel

TEXT = " ".join(
    f"The {a} {b} of the {c} was {d} in the year {y}." for a in ("old", "young", "quiet", "bright", "lost")
    for b in ("king", "queen", "river", "city", "song") for c in ("north", "south", "sea", "hill")
    for d in ("seen", "heard", "sung", "kept") for y in (1600, 1623)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    # init std 0.2: block outputs move far enough from the residual for quantization error to dominate
    model = make_tiny_checkpoint(root / "model", "qwen3", num_hidden_layers=3, vocab_size=300, initializer_range=0.2)
    save_tiny_tokenizer(model, TEXT, 300)
    text = root / "train.txt"
    text.write_text(TEXT)
    dump = root / "dump"
    extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=str(text), n_samples=6,
                                      seq_len=32, batch_size=2))
    return model, text, dump


def test_dump_layout(tiny):
    model, _, dump = tiny
    manifest = DumpManifest.load(dump)
    assert manifest.num_blocks == 3 and manifest.n_samples == 6
    for i in range(4):
        d = HiddenDump(boundary_path(dump, i))
        assert d.shape == (6, 32, 64) and d.read(0, 6).dtype == torch.bfloat16
    assert not list(dump.glob(".*tmp"))


def test_dump_resume_equals_uninterrupted(tiny, tmp_path):
    model, text, dump = tiny
    cfg = ExtractConfig(model=str(model), output_dir=str(tmp_path / "d"), dataset=str(text), n_samples=6,
                        seq_len=32, batch_size=2)
    extract_calibration(cfg)
    for i in (2, 3):  # as if killed after boundary 1
        boundary_path(cfg.output_dir, i).unlink()
    extract_calibration(cfg)
    for i in range(4):
        assert torch.equal(HiddenDump(boundary_path(cfg.output_dir, i)).read(0, 6),
                           HiddenDump(boundary_path(dump, i)).read(0, 6))


def test_dump_refuses_other_settings(tiny):
    model, text, dump = tiny
    with pytest.raises(DumpError, match="n_samples: 6 != 7"):
        extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=str(text), n_samples=7,
                                          seq_len=32))


def test_dump_accepts_the_same_dataset_by_another_path(tiny, monkeypatch):
    model, text, dump = tiny
    monkeypatch.chdir(text.parent)
    extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=text.name, n_samples=6,
                                      seq_len=32, batch_size=2))  # relative path, same file: nothing to redo


def test_dump_refuses_when_disk_is_short(tiny, tmp_path, monkeypatch):
    model, text, _ = tiny
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DumpError, match="GiB free but the dump needs"):
        extract_calibration(ExtractConfig(model=str(model), output_dir=str(tmp_path / "d"), dataset=str(text),
                                          n_samples=6, seq_len=32))


@pytest.mark.parametrize("scheme,act", [("w8a8c8", "static"), ("w4a8c16", "dynamic"), ("w4a8c8", "static")])
def test_learned_beats_rtn_and_eval_uses_params(tiny, tmp_path, scheme, act):
    model, text, dump = tiny
    common = dict(model=str(model), data_dir=str(dump), scheme=scheme, act=act, kv_format="int8",
                  group_size=32 if scheme.startswith("w4") else None)
    rtn = run_training(TrainConfig(output_dir=str(tmp_path / "rtn"), rtn=True, **common))
    learned = run_training(TrainConfig(output_dir=str(tmp_path / "lrn"), epochs=4, lr=5e-2, **common))
    r_rtn, r_lrn = rtn.records(), learned.records()
    assert len(r_lrn) == 3
    for a, b in zip(r_rtn, r_lrn):
        assert b["loss_rtn"] == pytest.approx(a["loss_rtn"])
        assert b["loss_learned"] <= b["loss_rtn"]
    assert sum(r["loss_learned"] < r["loss_rtn"] for r in r_lrn) >= 2
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    fp_model = StreamingModel(model, dtype="float32")
    nll_fp = sequence_nll(fp_model, ids)[0]
    nll_rtn = sequence_nll(fp_model, ids, block_transform=rtn.block_transform(3))[0]
    assert nll_rtn != nll_fp  # the params are really applied
    assert math.isfinite(nll_rtn)


def test_rerun_skips_done_blocks_and_refuses_other_runs(tiny, tmp_path):
    model, _, dump = tiny
    cfg = TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(tmp_path / "p"), scheme="w8a8c16",
                      epochs=1, start_block_idx=1, end_block_idx=2)
    params = run_training(cfg)
    assert params.done_blocks() == [1]
    stamp = params.record_path(1).stat().st_mtime_ns
    run_training(TrainConfig(**{**cfg.__dict__, "start_block_idx": 0, "end_block_idx": None}))
    assert params.done_blocks() == [0, 1, 2] and params.record_path(1).stat().st_mtime_ns == stamp
    with pytest.raises(ParamDirError, match="scheme"):
        run_training(TrainConfig(**{**cfg.__dict__, "scheme": "w8a8c8"}))


def test_sign_step_moves_each_offset_by_the_rate_and_clamps():
    from cores.calibrator.fit import sign_step

    p = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.49, -0.49, 0.2]))
    p.grad = torch.tensor([1e-9, -3.0, -1.0, 1.0, 0.0])  # the last: a weight the batch did not reach
    sign_step([p], 0.02)
    assert torch.equal(p.data, torch.tensor([-0.02, 0.02, 0.5, -0.5, 0.2]))


@pytest.mark.parametrize("signed", [False, True])
def test_updates_in_the_backward_equal_steps_after_it_bit_for_bit(signed):
    """The loop's steps in the backward (gradients freed at once) against ``zero_(); backward(); step()``
    with kept gradients: the same bits, an idle tensor's zero-gradient AdamW steps and -0 gradients included."""
    from cores.calibrator.fit import UpdateInBackward, sign_step

    def run(in_backward: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(5, 3, generator=gen) * 0.1) for _ in range(3)]
        rounding = ps[:2]  # two "experts", the second idle in some steps
        opt = torch.optim.AdamW([{"params": [] if signed else rounding, "lr": 5e-3}, {"params": ps[2:], "lr": 1e-2}],
                                weight_decay=0.0, foreach=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 6)
        updates = UpdateInBackward(ps, rounding if signed else [], opt) if in_backward else None
        for step in range(6):
            x = torch.randn(4, 5, generator=gen)
            y = (x @ ps[0]).relu() * ps[2][0]  # relu: some -0 and exact-zero gradients
            if step % 3 != 1:  # the second expert sits out steps 1 and 4
                y = y + (x @ ps[1]).clamp(min=0) * -1.0
            loss = y.pow(2).mean()
            if in_backward:
                updates.sign_lr = 0.05 * (1.0 - step / 6)
                loss.backward()
                updates.finish_step()
            else:
                for p in ps:
                    if p.grad is not None:
                        p.grad.zero_()
                loss.backward()
                if signed:
                    sign_step(rounding, 0.05 * (1.0 - step / 6))
                opt.step()
            sched.step()
        if in_backward:
            updates.remove()
            assert all(p.grad is None for p in ps)
        state = [t for p in ps for t in opt.state[p].values()]
        return [p.detach().clone() for p in ps] + state

    reference, in_backward = run(False), run(True)
    assert len(reference) == len(in_backward)
    assert all(torch.equal(a.view(torch.int32) if a.is_floating_point() and a.element_size() == 4 else a,
                           b.view(torch.int32) if b.is_floating_point() and b.element_size() == 4 else b)
               for a, b in zip(reference, in_backward))


def test_signed_rounding_learns_at_one_over_steps_and_refuses_unknown_updates(tiny, tmp_path):
    model, _, dump = tiny
    cfg = TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(tmp_path / "s"), scheme="w4a8c16",
                      group_size=32, epochs=3, round_optimizer="sign", smooth=False)
    records = run_training(cfg).records()
    assert all(r["round_optimizer"] == "sign" and r["loss_learned"] <= r["loss_rtn"] for r in records)
    assert all(r["round_lr"] == pytest.approx(1 / 18) for r in records)  # SignRound's 1 / steps: 3 epochs x 6
    assert sum(r["loss_learned"] < r["loss_rtn"] for r in records) >= 2
    offsets = [t for k, t in ParamDir(cfg.output_dir).load_block(0).items() if k.endswith("round_offset")]
    assert offsets and all(t.abs().max() <= 0.5 for t in offsets) and any(t.abs().max() > 0 for t in offsets)
    with pytest.raises(ValueError, match="round_optimizer 'lion'"):
        TrainConfig(model=str(model), data_dir=str(dump), output_dir="x", round_optimizer="lion")


def test_sequential_mode_trains_every_block(tiny, tmp_path):
    model, _, dump = tiny
    params = run_training(TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(tmp_path / "s"),
                                      scheme="w8a8c16", epochs=1, sequential=True))
    assert params.done_blocks() == [0, 1, 2]
    assert all(r["sequential"] for r in params.records())


def test_bfloat16_training_is_close_to_float32_and_keeps_learned_tensors_fp32(tiny, tmp_path, caplog):
    """``--dtype bfloat16``: finite losses near the float32 run's (its loss also holds the bf16 forward's own
    rounding), the same learned tensors in fp32, the dtype in the records (absent in float32, as before
    ``--dtype``), not in the identity: a resume in the other dtype keeps the finished blocks and says so;
    float16 and auto are refused."""
    model, _, dump = tiny
    common = dict(model=str(model), data_dir=str(dump), scheme="w8a8c8", act="static", kv_format="int8", epochs=2)
    fp32 = run_training(TrainConfig(output_dir=str(tmp_path / "fp32"), end_block_idx=2, **common))
    bf16 = run_training(TrainConfig(output_dir=str(tmp_path / "bf16"), end_block_idx=2, dtype="bfloat16", **common))
    assert bf16.done_blocks() == [0, 1]
    for a, b in zip(fp32.records(), bf16.records(), strict=True):
        for key in ("loss_rtn", "loss_learned"):
            assert math.isfinite(b[key]) and b[key] == pytest.approx(a[key], rel=0.5), key
        assert b["loss_learned"] <= b["loss_rtn"]
        assert b["dtype"] == "bfloat16" and "dtype" not in a
    for idx in (0, 1):
        ours, theirs = bf16.load_block(idx), fp32.load_block(idx)
        assert {k: t.dtype for k, t in ours.items()} == {k: t.dtype for k, t in theirs.items()}
    assert bf16.identity() == fp32.identity()
    caplog.clear()
    run_training(TrainConfig(output_dir=str(tmp_path / "bf16"), **common))  # float32 from block 2 on
    assert "block block(s) [0, 1] were trained with --dtype bfloat16 and are kept" in caplog.text
    assert [r.get("dtype") for r in bf16.records()] == ["bfloat16", "bfloat16", None]
    for dtype in ("float16", "auto"):
        with pytest.raises(ValueError, match=f"dtype '{dtype}'"):
            TrainConfig(dtype=dtype, output_dir="x", **common)
    out = tmp_path / "cli"
    assert main_cli.main(["--model", str(model), "--data_dir", str(dump), "--output_dir", str(out), "--dtype",
                          "bfloat16", "--rtn", "--end_block_idx", "1"]) == 0
    assert ParamDir(out).records()[0]["dtype"] == "bfloat16"


def test_nan_activations_are_named(tiny, tmp_path):
    model, _, dump = tiny
    import shutil

    bad = tmp_path / "dump"
    shutil.copytree(dump, bad)
    from safetensors.torch import load_file, save_file

    x = load_file(boundary_path(bad, 1))["hidden"]
    x[2, 5, 7] = float("nan")
    save_file({"hidden": x}, str(boundary_path(bad, 1)))
    DumpFiles(bad).record("hidden_001.safetensors", boundary_path(bad, 1))  # as if the FP model had overflowed
    with pytest.raises(DumpError, match="hidden_001.safetensors holds NaN"):
        run_training(TrainConfig(model=str(model), data_dir=str(bad), output_dir=str(tmp_path / "p"), epochs=1,
                                 start_block_idx=1, end_block_idx=2))


def test_cli_seed_spellings_and_eval(tiny, tmp_path, capsys):
    model, text, dump = tiny
    out = tmp_path / "p"
    assert main_cli.main(["--model", str(model), "--data_dir", str(dump), "--output_dir", str(out),
                          "--w_bits", "8", "--a_bits", "8", "--cls", "c8", "--epoch", "1", "--base_lr", "1e-2",
                          "--cali_bsz", "2", "--lwc", "--lac", "--dev", "cpu", "--kv_format", "int8"]) == 0
    identity = ParamDir(out).identity()
    assert identity["scheme"]["name"] == "w8a8c8" and identity["scheme"]["kv_format"] == "int8"
    assert json.loads(ParamDir(out).record_path(0).read_text())["batch_size"] == 2
    result = tmp_path / "ppl.json"
    assert eval_ppl.main(["--model", str(model), "--dataset", str(text), "--seq_len", "32", "--param_dir",
                          str(out), "--output_json", str(result)]) == 0
    assert json.loads(result.read_text())["param_dir"] == str(out)
    assert "fake-quant" in capsys.readouterr().out


def test_cli_asymmetric_static_activations_train_deploy_and_eval_as_trained(tiny, tmp_path):
    """main.py --act static --act_zero_point: learned two-ended ranges, deployed with input_zero_point, the
    deployed ppl equal to the fake-quant one; a symmetric run's identity has no act_symmetric (as before)."""
    import deploy as deploy_cli

    model, text, dump = tiny
    out, dep = tmp_path / "p", tmp_path / "d"
    args = ["--model", str(model), "--data_dir", str(dump), "--scheme", "w8a8c16", "--epochs", "1", "--act", "static"]
    assert main_cli.main([*args, "--output_dir", str(out), "--act_zero_point"]) == 0
    assert ParamDir(out).scheme().act_symmetric is False
    assert main_cli.main([*args, "--output_dir", str(tmp_path / "sym"), "--end_block_idx", "1"]) == 0
    assert "act_symmetric" not in ParamDir(tmp_path / "sym").identity()["scheme"]
    assert main_cli.main([*args[:-1], "dynamic", "--output_dir", str(tmp_path / "x"), "--act_zero_point"]) == 2
    assert deploy_cli.main(["--model", str(model), "--output_dir", str(dep), "--scheme", "w8a8c16",
                            "--param_dir", str(out)]) == 0
    ppl = {}
    for name, extra in (("fake", ["--model", str(model), "--param_dir", str(out)]), ("deployed", ["--model", str(dep)])):
        assert eval_ppl.main([*extra, "--dataset", str(text), "--seq_len", "32",
                              "--output_json", str(tmp_path / f"{name}.json")]) == 0
        ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["ppl"]
    assert ppl["deployed"] == pytest.approx(ppl["fake"], rel=1e-3)


def test_cli_yaml_config_and_errors(tiny, tmp_path):
    model, _, dump = tiny
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scheme: w4a8c16\ngroup_size: 32\nepochs: 0\nlr: 0.02\n")
    out = tmp_path / "p"
    assert main_cli.main(["--config", str(cfg), "--model", str(model), "--data_dir", str(dump),
                          "--output_dir", str(out), "--end_block_idx", "1"]) == 0
    assert ParamDir(out).identity()["scheme"]["group_size"] == 32
    cfg.write_text("schem: w4a8c16\n")
    assert main_cli.main(["--config", str(cfg), "--model", str(model), "--data_dir", str(dump),
                          "--output_dir", str(out)]) == 2
    assert main_cli.main(["--model", str(model), "--data_dir", str(tmp_path), "--output_dir", str(out)]) == 2
    assert extract_calib_data.main(["--model", str(model), "--output_dir", str(tmp_path / "x"),
                                    "--dataset", str(tmp_path / "nope.txt")]) == 2


def test_every_entry_point_reads_a_yaml_config(tiny, tmp_path, caplog):
    """``--config`` on extract / eval / deploy as on main.py: defaults < YAML < flags; a bad key is named and
    exits 2; ``--model`` / ``--output_dir`` / ``--scheme`` are deploy's names too."""
    import deploy as deploy_cli

    model, text, _ = tiny
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(f"model: {model}\ndataset: {text}\nn_samples: 4\nseq_len: 64\n")
    dump = tmp_path / "dump"
    assert extract_calib_data.main(["--config", str(cfg), "--output_dir", str(dump), "--seq_len", "16"]) == 0
    manifest = json.loads((dump / "manifest.json").read_text())
    assert (manifest["n_samples"], manifest["seq_len"]) == (4, 16)

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {model}\ndataset: {text}\nsplit: train\nseq_len: 16\nmax_windows: 3\n")
    result = tmp_path / "ppl.json"
    assert eval_ppl.main(["--config", str(cfg), "--max_windows", "2", "--output_json", str(result)]) == 0
    assert json.loads(result.read_text())["windows"] == 2

    cfg = tmp_path / "deploy.yaml"
    cfg.write_text("quant_type: w8a8c16\nmax_shard_size: 20KB\n")
    out = tmp_path / "deployed"
    assert deploy_cli.main(["--config", str(cfg), "--model", str(model), "--output_dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(list(out.glob("*.safetensors"))) > 1
    assert deploy_cli.main(["--config", str(cfg), "--model", str(model), "--output_dir", str(out),
                            "--scheme", "w4a8c16", "--group_size", "32", "--overwrite"]) == 0
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["weights"]["num_bits"] for g in groups.values()] == [4]

    caplog.clear()
    cfg.write_text("quant_typ: w8a8c16\n")
    assert deploy_cli.main(["--config", str(cfg), "--model", str(model), "--output_dir", str(tmp_path / "d2")]) == 2
    assert "quant_typ" in caplog.text and "valid:" in caplog.text
    assert eval_ppl.main(["--dataset", str(text)]) == 2
    assert "missing required option(s) --model" in caplog.text


def test_torchrun_two_ranks_split_the_blocks(tiny, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, _, dump = tiny
    out = tmp_path / "p"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "main.py", "--model", str(model), "--data_dir", str(dump),
                           "--output_dir", str(out), "--scheme", "w8a8c16", "--epochs", "1"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = ParamDir(out)
    assert params.done_blocks() == [0, 1, 2]
    assert "3 blocks in" in proc.stdout  # rank 0 prints the summary once all ranks are done


def test_full_name_ignore_entry_keeps_one_layer_in_training_and_deploy(tiny, tmp_path):
    """A compressed-tensors ``ignore`` entry (a full module name) matches in training as it does in deploy:
    that one layer of that one block stays float, in the param dir, the deployed folder and its config."""
    from cores.deploy import DeployConfig, deploy
    from cores.quantization import DEFAULT_IGNORE

    model, _, dump = tiny
    kept = "model.layers.1.mlp.down_proj"
    params = run_training(TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(tmp_path / "p"),
                                      scheme="w8a8c16", act="dynamic", epochs=1,
                                      ignore=(*DEFAULT_IGNORE, kept)))
    assert not any(k.startswith("mlp.down_proj.") for k in params.load_block(1))
    assert any(k.startswith("mlp.down_proj.") for k in params.load_block(0))
    out = tmp_path / "deployed"
    deploy(DeployConfig(str(model), str(out), "w8a8c16", param_dir=str(params.path)))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert kept in config["ignore"] and "model.layers.0.mlp.down_proj" not in config["ignore"]
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    fake, _ = sequence_nll(StreamingModel(model), ids, block_transform=params.block_transform(3))
    ours, _ = sequence_nll(StreamingModel(out), ids)
    assert abs(ours - fake) <= 1e-6 * abs(fake)
