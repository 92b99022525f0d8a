"""Bad input and interrupted runs: clear messages, and nothing under the output name unless it is complete."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import deploy as deploy_cli
from deploy_helpers import editable_copy
from blockptq_assets.tiny import make_tiny_checkpoint
from cores.calibrator.params import ParamDirError
from cores.deploy import DeployConfig, DeployError, deploy
from cores.deploy import writer as writer_mod
from cores.models.streaming import StreamingModel
from cores.utils.checkpoint import INDEX_NAME, CheckpointError


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _nothing_written(out):
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_unknown_quant_type_lists_the_valid_ones(tiny_llama, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        rc = deploy_cli.main(["--input_weight_path", str(tiny_llama), "--output_weight_path", str(out),
                              "--quant_type", "w3a8c8"])
    assert rc == 2 and "unknown quant_type 'w3a8c8'; valid: bfloat16, w4a8c16, w4a8c8, w8a8c16, w8a8c8" in caplog.text
    assert _nothing_written(out)


def test_params_from_another_model(tiny_llama, params_factory, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", "llama", seed=1)
    params = params_factory(tiny_llama, "w8a8c8")
    with pytest.raises(ParamDirError, match="trained on another model"):
        deploy(DeployConfig(str(other), str(tmp_path / "out"), "w8a8c8", param_dir=str(params.path)))
    assert _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("flags,match", [
    ({"quant_type": "w4a8c8"}, "--quant_type w4a8c8 but the params are w8a8c8"),
    ({"act": "dynamic"}, "--act dynamic but the params are static"),
    ({"kv_format": "int8"}, "--kv_format int8 but the params are fp8"),
])
def test_options_contradicting_the_params(tiny_llama, params_factory, tmp_path, flags, match):
    params = params_factory(tiny_llama, "w8a8c8")
    cfg = {"quant_type": "w8a8c8", **flags}
    with pytest.raises(DeployError, match=match):
        deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), param_dir=str(params.path), **cfg))


@pytest.mark.parametrize("quant_type,act", [("w8a8c16", "static"), ("w8a8c8", "dynamic")])
def test_rtn_refuses_scales_that_need_calibration(tiny_llama, tmp_path, quant_type, act):
    with pytest.raises(DeployError, match=r"needs calibrated .* run `main.py --rtn"):
        deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), quant_type, act=act))


def test_group_size_that_does_not_divide_is_refused_before_writing(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="group size 128 does not divide the input dim 64"):
        deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), "w4a8c16"))
    assert _nothing_written(tmp_path / "out")


def test_missing_shard(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard.* that are not in .*fetch the missing shard"):
        deploy(DeployConfig(str(broken), str(tmp_path / "out"), "w8a8c16"))
    assert _nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(DeployError, match="exists; pass --overwrite"):
        deploy(DeployConfig(str(tiny_llama), str(out), "w8a8c16"))
    deploy(DeployConfig(str(tiny_llama), str(out), "w8a8c16", overwrite=True))
    assert not (out / "old.txt").exists() and (out / INDEX_NAME).is_file()
    assert not out.with_name("out.deploy-old").exists() and not out.with_name("out.partial").exists()


def test_foreign_staging_folder_is_not_deleted(tiny_llama, tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "mine.txt").write_text("keep")
    with pytest.raises(DeployError, match="was not made by deploy.py"):
        deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), "w8a8c16"))
    assert (tmp_path / "out.partial" / "mine.txt").read_text() == "keep"


@pytest.fixture(params=[1, 2], ids=["writer-thread", "writes-in-caller"])
def torch_threads(request):
    """Torch's thread count, which decides where a deploy writes (a thread of its own on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(threads)


def test_crash_then_rerun_resumes_to_the_same_checkpoint(tiny_llama, params_factory, tmp_path, monkeypatch,
                                                          torch_threads):
    params = params_factory(tiny_llama, "w8a8c8", "static", "int8")
    cfg = DeployConfig(str(tiny_llama), str(tmp_path / "out"), "w8a8c8", param_dir=str(params.path),
                       max_shard_size="20KB")
    deploy(DeployConfig(str(tiny_llama), str(tmp_path / "ref"), "w8a8c8", param_dir=str(params.path),
                        max_shard_size="20KB"))
    real_write, real_load, loads, opened = writer_mod.ShardedWriter.write, StreamingModel.load_block, [], []

    def crash_in_block_1(self, name, piece):
        if name.startswith("model.layers.1.") and not loads[2:]:
            raise RuntimeError("simulated crash")
        return real_write(self, name, piece)

    monkeypatch.setattr(writer_mod.ShardedWriter, "write", crash_in_block_1)
    monkeypatch.setattr(StreamingModel, "load_block", lambda self, idx: loads.append(idx) or real_load(self, idx))
    with pytest.raises(RuntimeError, match="simulated crash"):
        deploy(cfg)
    partial = tmp_path / "out.partial"
    assert not (tmp_path / "out").exists() and not (partial / INDEX_NAME).exists()
    progress = json.loads((partial / "deploy_progress.json").read_text())
    finished = {shard["file"] for shard in progress["shards"]}
    written = {k for shard in progress["shards"] for k in shard["keys"]}
    assert "model.embed_tokens.weight" in written and any(k.startswith("model.layers.0.") for k in written)
    assert not any(k.startswith("model.layers.1.") for k in written)
    real_shard = writer_mod.ShardFile.__init__
    monkeypatch.setattr(writer_mod.ShardFile, "__init__",
                        lambda self, path, *args: opened.append(path.name) or real_shard(self, path, *args))
    result = deploy(cfg)
    assert loads[:2] == [0, 1] and loads[2:] in ([0, 1], [1])  # block 0 again only for its tensors in unfinished shards
    everything = json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"]
    assert sorted(opened) == sorted(set(everything.values()) - finished)  # finished shards were not written again
    assert not partial.exists() and result.verify["FAIL"] == 0 and result.verify["checked"] == 14
    ours, ref = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert (tmp_path / "out" / INDEX_NAME).read_text() == (tmp_path / "ref" / INDEX_NAME).read_text()
    report = json.loads((tmp_path / "out" / "deploy_report.json").read_text())
    assert report["tensors"] == json.loads((tmp_path / "ref" / "deploy_report.json").read_text())["tensors"]


def test_rerun_with_other_settings_starts_over(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(StreamingModel, "load_block", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), "w8a8c16", max_shard_size="20KB"))
    monkeypatch.undo()
    deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), "w8a8c16", max_shard_size="1MB"))
    deploy(DeployConfig(str(tiny_llama), str(tmp_path / "ref"), "w8a8c16", max_shard_size="1MB"))
    ours, ref = _tensors(tmp_path / "out"), _tensors(tmp_path / "ref")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_loader_names_a_missing_deployed_tensor(deployed, tmp_path):
    _, out = deployed("w8a8c8", "static", "fp8")
    broken = editable_copy(out, tmp_path / "broken")
    index = json.loads((broken / INDEX_NAME).read_text())
    key = "model.layers.1.mlp.down_proj.input_scale"
    shard = broken / index["weight_map"].pop(key)
    save_file({k: v for k, v in load_file(shard).items() if k != key}, str(shard))
    (broken / INDEX_NAME).write_text(json.dumps(index))
    model = StreamingModel(broken)
    model.load_block(0)
    with pytest.raises(CheckpointError, match=r"block 1 .* has no tensor 'mlp.down_proj.input_scale'"):
        model.load_block(1)
