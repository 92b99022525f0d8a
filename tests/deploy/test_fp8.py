"""bfloat16: FP8 (DeepSeek layout) -> BF16, shard by shard; and quantized deploys from an FP8 source."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockptq_assets.tiny import fp8_twins
from cores.deploy import DeployConfig, DeployError, deploy
from cores.utils.checkpoint import INDEX_NAME


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def twins(tiny_llama, tmp_path_factory):
    """An FP8 copy of ``tiny_llama`` re-sharded in two (scales split from some weights) and its bf16 twin."""
    root = tmp_path_factory.mktemp("fp8")
    fp8, bf16 = fp8_twins(tiny_llama, root / "fp8", root / "bf16")
    tensors = load_file(fp8 / "model.safetensors")
    (fp8 / "model.safetensors").unlink()
    keys = sorted(tensors)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2:]
    split = next(k for k in first if k + "_scale_inv" in first)  # a weight whose scale lives in the other shard
    first.remove(split + "_scale_inv")
    second.append(split + "_scale_inv")
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(fp8 / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (fp8 / INDEX_NAME).write_text(json.dumps(index))
    for side in ("tokenizer.json", "generation_config.json"):
        (fp8 / side).write_bytes((tiny_llama / side).read_bytes())
    return fp8, bf16


def test_bfloat16_equals_the_bf16_twin(twins, tmp_path):
    fp8, bf16 = twins
    result = deploy(DeployConfig(str(fp8), str(tmp_path / "out"), "bfloat16"))
    out = tmp_path / "out"
    ours, ref = _tensors(out), _tensors(bf16)
    assert ours.keys() == ref.keys() and not any(k.endswith("_scale_inv") for k in ours)
    assert all(ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]) for k in ref)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in fp8.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert result.verify["checked"] == 14 and result.verify["GOOD"] == 14


def test_bfloat16_with_dtype_writes_that_dtype(twins, tmp_path):
    """``--dtype float32``: the dequantized weights and every other tensor widened, exactly, and declared."""
    fp8, bf16 = twins
    deploy(DeployConfig(str(fp8), str(tmp_path / "out"), "bfloat16", dtype="float32"))
    ours, ref = _tensors(tmp_path / "out"), _tensors(bf16)
    assert ours.keys() == ref.keys()
    assert all(ours[k].dtype == torch.float32 and torch.equal(ours[k], ref[k].float()) for k in ref)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_bfloat16_refuses_non_fp8_and_quant_options(tiny_llama, twins, tmp_path):
    with pytest.raises(DeployError, match="holds no FP8 weights"):
        deploy(DeployConfig(str(tiny_llama), str(tmp_path / "out"), "bfloat16"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(DeployError, match="takes no param_dir, act"):
        deploy(DeployConfig(str(twins[0]), str(tmp_path / "out"), "bfloat16", param_dir="p", act="static"))


def test_quantized_deploy_from_fp8_equals_deploy_from_its_bf16_twin(twins, tmp_path):
    fp8, bf16 = twins
    for src in (fp8, bf16):
        deploy(DeployConfig(str(src), str(tmp_path / src.name), "w8a8c16"))
    ours, ref = _tensors(tmp_path / "fp8"), _tensors(tmp_path / "bf16")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
