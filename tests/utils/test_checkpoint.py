"""Checkpoint reading: shards, FP8 sources, and clear errors for bad input."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from cores.models.hidden_store import HiddenStore

from cores.models.run import chunked_nll, sequence_nll

from cores.models.streaming import StreamingModel
from cores.utils.checkpoint import (
    CheckpointError,
    CheckpointReader,
    dequantize_fp8_blockwise,
    fp8_e4m3_to_float,
    iter_dequantize_fp8,
)
from blockptq_assets.tiny import fp8_twins, make_tiny_checkpoint, quantize_fp8_blockwise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), "llama", num_hidden_layers=3,
                                max_shard_size="100KB")


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


def test_sharded_equals_single_file(ckpt, sharded, ids):
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = sequence_nll(StreamingModel(ckpt, dtype="float32"), ids)
    b = sequence_nll(StreamingModel(sharded, dtype="float32"), ids)
    assert a == b


def test_block_read_touches_only_its_tensors(sharded):
    reader = CheckpointReader(sharded)
    state = reader.read_prefix("model.layers.1.")
    assert set(state) == {k[len("model.layers.1."):] for k in reader.keys if k.startswith("model.layers.1.")}
    assert all(not k.startswith("model.layers.1") for k in reader.keys_with_prefix("model.layers.2."))


def test_fp8_blockwise_roundtrip():
    w = torch.randn(200, 300)
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    deq = dequantize_fp8_blockwise(q, s).float()
    assert torch.allclose(deq, w, rtol=0.07, atol=1e-3)


def test_fp8_to_float_is_torchs_cast_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ours, ref = fp8_e4m3_to_float(codes, torch.empty(256)), codes.float()
    assert torch.equal(ours.isnan(), ref.isnan()) and ref.isnan().sum() == 2
    assert torch.equal(ours[~ref.isnan()].view(torch.int32), ref[~ref.isnan()].view(torch.int32))  # -0.0 too


@pytest.mark.parametrize("shape", [(300, 200), (256, 128), (1, 5), (129, 257)])
@pytest.mark.parametrize("chunk_elements", [1, 40_000, 1 << 20])
def test_fp8_dequantization_in_chunks_is_the_product_rounded_once(shape, chunk_elements):
    q, s = quantize_fp8_blockwise(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3)
    s = s * torch.rand(s.shape, generator=torch.Generator().manual_seed(1)) * 4
    full_scale = s.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
    expected = (q.float() * full_scale).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for rows, values in iter_dequantize_fp8(q, s, chunk_elements=chunk_elements):
        assert rows.start % 128 == 0
        out[rows] = values
    assert torch.equal(out, expected) and torch.equal(dequantize_fp8_blockwise(q, s), expected)


def test_reader_specs_and_chunks_are_what_read_gives(ckpt, tmp_path):
    fp8_dir, _ = fp8_twins(ckpt, tmp_path / "fp8", tmp_path / "bf16")
    reader = CheckpointReader(fp8_dir)
    keys = [k for k in reader.keys if not k.endswith("_scale_inv")]
    whole = reader.read(keys)
    pieces: dict[str, list[torch.Tensor]] = {}
    for key, piece in reader.iter_chunks(keys, chunk_elements=1):
        pieces.setdefault(key, []).append(piece.clone())
    assert list(pieces) == keys
    for key in keys:
        assert reader.spec(key) == (whole[key].dtype, tuple(whole[key].shape))
        assert torch.equal(torch.cat(pieces[key]) if len(pieces[key]) > 1 else pieces[key][0], whole[key])
    fp8 = next(k for k in keys if reader.has(k + "_scale_inv"))
    raw = reader.read([fp8], dequantize=False)
    assert raw.keys() == {fp8, fp8 + "_scale_inv"} and raw[fp8].dtype == torch.float8_e4m3fn


def test_fp8_checkpoint_equals_bf16_twin(ckpt, tmp_path, ids):
    fp8_dir, bf16_dir = fp8_twins(ckpt, tmp_path / "fp8", tmp_path / "bf16")
    keys = CheckpointReader(fp8_dir).keys
    assert any(k.endswith("weight_scale_inv") for k in keys)
    fp8 = sequence_nll(StreamingModel(fp8_dir, dtype="float32"), ids)
    bf16 = sequence_nll(StreamingModel(bf16_dir, dtype="float32"), ids)
    assert fp8 == bf16
    src = sequence_nll(StreamingModel(ckpt, dtype="float32"), ids)
    assert math.isclose(fp8[0], src[0], rel_tol=0.02)  # e4m3 is close to but not equal to the source


def test_disk_offload_equals_ram(ckpt, tmp_path, ids):
    ram = sequence_nll(StreamingModel(ckpt, dtype="float32"), ids)
    disk = sequence_nll(StreamingModel(ckpt, dtype="float32"), ids, offload_dir=tmp_path / "cache")
    assert ram == disk
    assert list((tmp_path / "cache").iterdir()) == []  # the cache file is removed


def test_hidden_store_bf16_file_roundtrip(tmp_path):
    x = torch.randn(5, 7, 3).to(torch.bfloat16)
    with HiddenStore.create((5, 7, 3), torch.bfloat16, tmp_path) as store:
        store.write(0, x[:2])
        store.write(2, x[2:])
        assert torch.equal(store.read(1, 4), x[1:4])


def test_chunked_nll_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(50, 16, generator=g), torch.randn(1000, 16, generator=g)
    targets = torch.randint(0, 1000, (50,), generator=g)
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert math.isclose(float(chunked_nll(hidden, targets, weight, chunk=128)), float(expected), rel_tol=1e-6)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_named(sharded, tmp_path):
    bad = _copy(sharded, tmp_path / "m")
    victim = sorted(bad.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        CheckpointReader(bad)


def test_key_missing_from_index(sharded, tmp_path):
    bad = _copy(sharded, tmp_path / "m")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    model = StreamingModel(bad, dtype="float32")
    model.load_block(1)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        model.load_block(2)


def test_unsupported_model_type(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        StreamingModel(bad)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_named(ckpt, tmp_path, keep):
    bad = _copy(ckpt, tmp_path / "m")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        StreamingModel(bad).load_block(0)


def test_corrupt_header_named(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "m")
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(bad)


def test_config_weights_shape_mismatch(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight .* has shape .*128.* but config.json implies .*96"):
        StreamingModel(bad).load_block(0)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        CheckpointReader(tmp_path)
