"""``--quant_type fp8``: e4m3 weights with 128x128 ``weight_scale_inv`` tiles, shard by shard, verified, resumable."""

import json
import logging

import pytest
import torch
from deploy_helpers import SEQ, TEXT, logits
from safetensors import safe_open

import deploy as deploy_cli
import eval_ppl
from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer
from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.deploy import DeployConfig, DeployError, deploy
from cores.deploy import writer as writer_mod
from cores.deploy.fp8_block import plan_fp8
from cores.deploy.fp8_stats import ActStats, collect_act_stats
from cores.deploy.verify import FP8_BANDS, WeightCheck
from cores.quantization.fp8_block import Fp8BlockConfig, dequantize_tiles, quantize_fp8_block, scale_grid
from cores.utils.checkpoint import INDEX_NAME, CheckpointReader

MODES = ["max", "rms", "percentile", "mse"]


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(
        a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
        b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]) for k in a)


def _nothing_written(out):
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A bf16 2-block llama on 128x128 grids, some ragged: hidden 256 (q 256 rows, k / v 128), intermediate 320
    (gate / up off the tile rows: kept bf16; down 320 wide), in several shards."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "llama", "llama", dtype=torch.bfloat16,
                                max_shard_size="400KB", hidden_size=256, intermediate_size=320)
    save_tiny_tokenizer(path, TEXT, 512)
    return path


@pytest.fixture(scope="module")
def dump(wide, tmp_path_factory):
    """A calibration dump of ``wide`` (4 windows of ``SEQ`` tokens)."""
    root = tmp_path_factory.mktemp("dump")
    text = root / "calib.txt"
    text.write_text(TEXT * 4)
    extract_calibration(ExtractConfig(model=str(wide), output_dir=str(root / "dump"), dataset=str(text),
                                      n_samples=4, seq_len=SEQ, batch_size=2))
    return root / "dump"


@pytest.fixture(scope="module")
def fp8_out(wide, dump, tmp_path_factory):
    """``(mode, act-aware) -> deployed folder`` of ``wide``, cached."""
    cache = {}

    def make(mode="max", act=False):
        if (mode, act) not in cache:
            out = tmp_path_factory.mktemp("fp8") / f"{mode}-{act}"
            deploy(DeployConfig(str(wide), str(out), "fp8", fp8_mode=mode, calib_dir=str(dump) if act else None))
            cache[mode, act] = out
        return cache[mode, act]

    return make


def test_layout_names_dtypes_and_config(wide, fp8_out):
    out = fp8_out("max")
    src, ours = _tensors(wide), _tensors(out)
    linears = {k for k, v in src.items() if v.dim() == 2 and k.startswith("model.layers.")
               and not k.endswith(("gate_proj.weight", "up_proj.weight"))}
    assert len(linears) == 10
    assert set(ours) == set(src) | {k + "_scale_inv" for k in linears}
    for key in linears:
        assert ours[key].dtype == torch.float8_e4m3fn and ours[key].shape == src[key].shape
        scale = ours[key + "_scale_inv"]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_grid(*src[key].shape)
        codes, ref_scale = quantize_fp8_block(src[key])  # max: DeepSeek's absmax cast
        assert torch.equal(scale, ref_scale) and torch.equal(ours[key].view(torch.uint8), codes.view(torch.uint8))
    assert {tuple(ours[k + "_scale_inv"].shape) for k in linears} == {(2, 2), (1, 2), (2, 3)}
    for key in set(src) - linears:  # embeddings, lm_head, norms: as stored
        assert ours[key].dtype == torch.bfloat16 and torch.equal(ours[key], src[key]), key
    # shard by shard: same file names, each tensor (and its scale) in the shard of its source
    src_map = json.loads((wide / INDEX_NAME).read_text())["weight_map"]
    out_map = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert len(set(src_map.values())) >= 3 and set(out_map.values()) == set(src_map.values())
    assert all(out_map[k] == src_map[k] and out_map.get(k + "_scale_inv", src_map[k]) == src_map[k] for k in src_map)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens", *[f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1)
                                                                      for p in ("gate", "up")]]}
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    report = json.loads((out / "deploy_report.json").read_text())
    assert report["fp8"] == {"calibration": "max", "calib_dir": None}
    assert report["summary"]["checked"] == 10 and report["summary"]["GOOD"] == 10
    assert {t["fmt"] for t in report["tensors"]} == {"fp8"} and min(t["cosine"] for t in report["tensors"]) > 0.999


def test_fused_siblings_off_the_tile_grid_stay_bf16(tmp_path):
    """vLLM merges q/k/v and gate/up: a member before the last whose out dim is off the 128-row grid keeps the
    whole group bf16 (SmolLM2's q_proj: 576 rows)."""
    src = make_tiny_checkpoint(tmp_path / "m", "llama", dtype=torch.bfloat16, hidden_size=192, intermediate_size=256)
    plan = plan_fp8(CheckpointReader(src))
    leaves = {k.removesuffix(".weight").rsplit(".", 1)[1] for k in plan.converted}
    assert leaves == {"o_proj", "gate_proj", "up_proj", "down_proj"}  # q 192 rows: q, k, v kept
    assert {m for m in plan.kept if m.startswith("model.layers.0.")} == {
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    aligned = plan_fp8(CheckpointReader(make_tiny_checkpoint(tmp_path / "a", "llama", dtype=torch.bfloat16,
                                                             hidden_size=256, intermediate_size=256,
                                                             num_key_value_heads=2)))
    assert len(aligned.converted) == 14 and aligned.kept == ["lm_head", "model.embed_tokens"]  # k / v: 128 rows


def test_modules_to_not_convert_lists_every_kept_2d_weight(tiny_deepseek_like):
    """Router gates and the MTP layer stay bf16 and are named; norms (1-D) are not."""
    reader, plan = tiny_deepseek_like
    kept_2d = {k.removesuffix(".weight") for k in reader.keys
               if k.endswith(".weight") and len(reader.spec(k)[1]) == 2 and k not in plan.converted}
    assert set(plan.kept) == kept_2d
    assert any(m.endswith(".mlp.gate") for m in plan.kept) and "model.embed_tokens" in plan.kept
    assert not any(k.endswith(".mlp.gate.weight") or "norm" in k for k in plan.converted)
    assert any(".mlp.experts." in k for k in plan.converted)


@pytest.fixture(scope="module")
def tiny_deepseek_like(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ds") / "ds", "deepseek_v3", dtype=torch.bfloat16)
    reader = CheckpointReader(path)
    return reader, plan_fp8(reader)


@pytest.mark.parametrize("mode,act", [("max", False), ("mse", False), ("mse", True), ("rms", True),
                                      ("percentile", True)])
def test_loader_reads_it_back_close_to_bf16(wide, fp8_out, ids, mode, act):
    out = fp8_out(mode, act)
    reader, ours = CheckpointReader(out), _tensors(out)
    key = "model.layers.1.mlp.down_proj.weight"
    restored = reader.read([key])[key]  # the loader's dequantization
    assert restored.dtype == torch.bfloat16
    assert torch.equal(restored, dequantize_tiles(ours[key], ours[key + "_scale_inv"]).bfloat16())
    ref, got = logits(wide, ids), logits(out, ids)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.995, cos  # ~0.998 (each weight ~0.9996) through 2 random blocks


def test_eval_ppl_of_the_fp8_checkpoint_is_close_to_bf16(wide, fp8_out, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    args = ["--dataset", str(text), "--seq_len", "16", "--max_windows", "4"]
    ppl = {}
    for name, model in (("bf16", wide), ("fp8", fp8_out("mse"))):
        assert eval_ppl.main(["--model", str(model), *args, "--output_json", str(tmp_path / f"{name}.json")]) == 0
        ppl[name] = json.loads((tmp_path / f"{name}.json").read_text())["ppl"]
    assert ppl["fp8"] == pytest.approx(ppl["bf16"], rel=0.01)


def test_calib_dir_weights_the_scales_by_activation_statistics(wide, dump, fp8_out, tmp_path):
    stats_dir = tmp_path / "stats"
    collect_act_stats(wide, dump, stats_dir)
    stats = ActStats(stats_dir, "model.layers.")
    prefix = "model.layers.1."
    q, k, v = (stats.get(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv")
    assert q.shape == (256,) and torch.equal(q, k) and torch.equal(q, v) and (q > 0).all()  # one input, one stat
    gate, up, down = (stats.get(f"{prefix}mlp.{p}_proj.weight") for p in ("gate", "up", "down"))
    assert torch.equal(gate, up) and down.shape == (320,)
    assert stats.get("model.embed_tokens.weight") is None
    aware, plain = _tensors(fp8_out("mse", True)), _tensors(fp8_out("mse"))
    scales = [k for k in aware if k.endswith("_scale_inv")]
    assert any(not torch.equal(aware[k], plain[k]) for k in scales)
    report = json.loads((fp8_out("mse", True) / "deploy_report.json").read_text())
    assert report["fp8"]["calib_dir"] == str(dump) and report["fp8"]["calibration"] == "mse grid=20 from 0.5"
    assert report["identity"]["params"]["calib"]["model_fingerprint"]  # the dump's files identify the deploy


def test_dump_of_another_model_is_refused_before_writing(dump, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", "llama", dtype=torch.bfloat16, hidden_size=256,
                                 intermediate_size=320, seed=1)
    with pytest.raises(DeployError, match="was dumped from another model"):
        deploy(DeployConfig(str(other), str(tmp_path / "out"), "fp8", fp8_mode="mse", calib_dir=str(dump)))
    assert _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flags,match", [
    ({"param_dir": "p"}, "fp8 quantizes weights to e4m3 tiles .* takes no param_dir"),
    ({"act": "static", "kv_format": "fp8"}, "takes no act, kv_format"),
    ({"calib_dir": "d"}, "--fp8_mode max has no clip to choose and takes no --calib_dir"),
    ({"fp8_mode": "absmax"}, "unknown FP8 calibration mode 'absmax'"),
    ({"fp8_mode": "rms", "fp8_k": -1.0}, "k must be positive"),
    ({"fp8_mode": "percentile", "fp8_percentile": 0.0}, r"percentile must be in \(0, 100\]"),
    ({"quant_type": "w8a8c16", "fp8_mode": "mse"}, "--fp8_mode only apply to --quant_type fp8, not w8a8c16"),
    ({"quant_type": "bfloat16", "calib_dir": "d"}, "--calib_dir only apply to --quant_type fp8"),
])
def test_bad_flag_combinations_are_refused(wide, tmp_path, flags, match):
    cfg = {"quant_type": "fp8", **flags}
    with pytest.raises(DeployError, match=match):
        deploy(DeployConfig(str(wide), str(tmp_path / "out"), **cfg))
    assert _nothing_written(tmp_path / "out")


def test_already_fp8_source_is_refused_and_bf16_of_it_redeploys(fp8_out, tmp_path):
    out = fp8_out("max")
    with pytest.raises(DeployError, match="already an FP8 checkpoint .* dequantize it first with --quant_type "
                                          "bfloat16"):
        deploy(DeployConfig(str(out), str(tmp_path / "again"), "fp8"))
    assert _nothing_written(tmp_path / "again")
    deploy(DeployConfig(str(out), str(tmp_path / "bf16"), "bfloat16"))
    deploy(DeployConfig(str(tmp_path / "bf16"), str(tmp_path / "again"), "fp8"))
    again, first = _tensors(tmp_path / "again"), _tensors(out)
    # the bf16 of an absmax cast re-casts to the same codes and scales (each tile's absmax is a code times 1)
    assert _same(again, first)


def test_fail_gives_a_non_zero_exit_and_recommendations(wide, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = deploy_cli.main(["--input_weight_path", str(wide), "--output_weight_path", str(out), "--quant_type",
                              "fp8", "--fp8_mode", "rms", "--fp8_k", "0.5"])
    assert rc == 1
    report = json.loads((out / "deploy_report.json").read_text())
    assert report["summary"]["FAIL"] == 10
    assert any("do not ship this checkpoint" in line for line in report["summary"]["recommendations"])
    assert "raise --fp8_k" in caplog.text and "FAIL verification" in caplog.text
    rc = deploy_cli.main(["--input_weight_path", str(wide), "--output_weight_path", str(tmp_path / "ok"),
                          "--quant_type", "fp8", "--fp8_mode", "mse"])
    assert rc == 0


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(wide, fp8_out, tmp_path):
    out = tmp_path / "out"
    deploy(DeployConfig(str(wide), str(out), "fp8"))
    first = _tensors(out)
    again = deploy(DeployConfig(str(wide), str(out), "fp8"))  # same inputs and settings: nothing to do
    assert again.verify["GOOD"] == 10 and _same(_tensors(out), first)
    with pytest.raises(DeployError, match="exists; pass --overwrite"):
        deploy(DeployConfig(str(wide), str(out), "fp8", fp8_mode="mse"))
    deploy(DeployConfig(str(wide), str(out), "fp8", fp8_mode="mse", overwrite=True))
    assert _same(_tensors(out), _tensors(fp8_out("mse")))


def test_crash_then_rerun_resumes_to_the_same_checkpoint(wide, dump, fp8_out, tmp_path, monkeypatch):
    cfg = DeployConfig(str(wide), str(tmp_path / "out"), "fp8", fp8_mode="mse", calib_dir=str(dump))
    real_write, opened = writer_mod.ShardedWriter.write, []

    def crash_in_block_1(self, name, piece):
        if name.startswith("model.layers.1."):
            raise RuntimeError("simulated crash")
        return real_write(self, name, piece)

    monkeypatch.setattr(writer_mod.ShardedWriter, "write", crash_in_block_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        deploy(cfg)
    partial = tmp_path / "out.partial"
    progress = json.loads((partial / "deploy_progress.json").read_text())
    finished = {shard["file"] for shard in progress["shards"]}
    assert finished and not (tmp_path / "out").exists()
    monkeypatch.setattr(writer_mod.ShardedWriter, "write", real_write)
    real_shard = writer_mod.ShardFile.__init__
    monkeypatch.setattr(writer_mod.ShardFile, "__init__",
                        lambda self, path, *args: opened.append(path.name) or real_shard(self, path, *args))
    result = deploy(cfg)
    everything = json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"]
    assert sorted(opened) == sorted(set(everything.values()) - finished)  # finished shards were not written again
    assert not partial.exists() and result.verify["checked"] == 10 and result.verify["FAIL"] == 0
    ref = fp8_out("mse", True)
    assert _same(_tensors(tmp_path / "out"), _tensors(ref))
    assert (tmp_path / "out" / INDEX_NAME).read_text() == (ref / INDEX_NAME).read_text()


def test_verify_samples_checks_a_subset(wide, tmp_path):
    result = deploy(DeployConfig(str(wide), str(tmp_path / "out"), "fp8", verify_samples=3))
    assert result.verify["checked"] == 3


def test_fp8_block_config_defaults():
    assert DeployConfig("a", "b", "fp8").fp8_block_config() == Fp8BlockConfig()
    assert DeployConfig("a", "b", "fp8", fp8_mode="rms", fp8_k=4.0).fp8_block_config().describe() == "rms k=4"


def test_peak_error_fails_a_clipped_outlier_that_the_cosine_misses():
    """One 20-sigma weight among 512 x 1024 Gaussian ones: rms k=6 clips it to ~6 sigma, which moves the cosine
    by ~2e-4 (GOOD) but loses 70 % of the tensor's largest weight (FAIL); on a quiet input channel the same clip
    costs little (the activation-weighted peak); absmax scales never clip."""
    torch.manual_seed(0)
    w = torch.randn(512, 1024)
    w[5, 7] = 20.0

    def check(cfg, peak_weight=None):
        codes, scale_inv = quantize_fp8_block(w, cfg)
        wc = WeightCheck("m", 8, fmt="fp8", peak_weight=peak_weight)
        wc.update(w, dequantize_tiles(codes, scale_inv), torch.ones(1))
        return wc.result()

    clipped = check(Fp8BlockConfig(mode="rms", k=6.0))
    assert clipped.cosine >= FP8_BANDS[0] and clipped.peak_err > 0.6 and clipped.band == "FAIL"
    quiet = torch.ones(1024)
    quiet[7] = 0.01  # channel 7 carries 1 % of the others' rms
    assert check(Fp8BlockConfig(mode="rms", k=6.0), quiet).band == "GOOD"
    unclipped = check(Fp8BlockConfig(mode="max"))
    assert unclipped.band == "GOOD" and unclipped.peak_err <= 1 / 16
    assert check(Fp8BlockConfig(mode="mse")).band == "GOOD"  # mse keeps the outlier: clipping it costs more


@pytest.mark.slow
def test_smollm2_outlier_clipping_fails_verification(assets, tmp_path):
    """On the real model rms k=6 (ppl 6466 against 32.8 bf16) exits 1 with down_proj FAIL, on the peak error:
    the cosine alone kept every tensor GOOD / WARN; absmax scales pass with every tensor GOOD."""
    out = tmp_path / "rms"
    args = ["--input_weight_path", str(assets.model_dir), "--quant_type", "fp8"]
    assert deploy_cli.main([*args, "--output_weight_path", str(out), "--fp8_mode", "rms"]) == 1
    summ = json.loads((out / "deploy_report.json").read_text())["summary"]
    down = summ["by_kind"]["down_proj"]
    assert down["FAIL"] >= 20 and down["max_peak_err"] > 0.5 and down["min_cosine"] > FP8_BANDS[1]
    assert deploy_cli.main([*args, "--output_weight_path", str(tmp_path / "max")]) == 0
    summ = json.loads((tmp_path / "max" / "deploy_report.json").read_text())["summary"]
    assert summ["GOOD"] == summ["checked"] > 100 and summ["by_kind"]["down_proj"]["max_peak_err"] < 1 / 16
