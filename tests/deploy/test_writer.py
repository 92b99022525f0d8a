"""Streamed safetensors shards and the in-line weight checks."""

import json
import math
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cores.deploy.pack import iter_weight_chunks
from cores.deploy.verify import BANDS, WeightCheck
from cores.deploy.writer import (
    WRITE_PIECE_BYTES,
    DeployError,
    PieceWriter,
    ShardFile,
    TensorSpec,
    cut_into_shards,
    shard_names,
)
from cores.quantization import WeightQuantizer, Workspace, per_channel, per_group


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randint(-128, 128, (7, 5), generator=gen, dtype=torch.int8),
            "a.weight_scale": torch.rand(7, 1, generator=gen),
            "b.weight": torch.randn(3, 9, generator=gen).bfloat16(),
            "b.weight_shape": torch.tensor([3, 9]),
            "c.bias": torch.randn(3, generator=gen).to(torch.float8_e4m3fn),
            "d.empty": torch.zeros(0, 4),
            "e.flag": torch.tensor([True, False])}


def test_shard_streamed_in_pieces_reads_back_with_safetensors(tmp_path):
    tensors = _tensors()
    shard = ShardFile(tmp_path / "model.safetensors", [TensorSpec.of(k, v) for k, v in tensors.items()])
    assert not shard.complete
    for name, tensor in tensors.items():
        rows = [tensor[i:i + 2] for i in range(0, len(tensor), 2)] if tensor.dim() > 1 else [tensor]
        done = [shard.write(name, piece) for piece in rows or [tensor]]
        assert done[-1] and not any(done[:-1])
    shard.close()
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in tensors.items() if v.numel())
    assert not list(tmp_path.glob(".*.tmp"))
    with open(tmp_path / "model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    assert (8 + size) % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    for name, tensor in tensors.items():  # every tensor starts at a multiple of its element size
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_shard_refuses_what_the_plan_does_not_hold(tmp_path):
    shard = ShardFile(tmp_path / "s.safetensors", [TensorSpec("w", torch.int8, (2, 4))])
    with pytest.raises(DeployError, match="plan has 8 bytes of torch.int8"):
        shard.write("w", torch.zeros(2, 4))
    shard.write("w", torch.zeros(1, 4, dtype=torch.int8))
    with pytest.raises(DeployError, match="w.*not written whole"):
        shard.close()
    shard = ShardFile(tmp_path / "t.safetensors", [TensorSpec("w", torch.int8, (2, 4))])
    shard.write("w", torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(DeployError, match="after 8"):
        shard.write("w", torch.zeros(1, 4, dtype=torch.int8))


def test_a_failed_background_write_of_a_shard_is_a_deploy_error(tmp_path):
    """The writer itself is tested in tests/utils/test_safetensors_stream.py; deploy's raises its own error."""
    (tmp_path / "f").touch()
    writer, fd = PieceWriter(background=True), os.open(tmp_path / "f", os.O_RDONLY)
    try:
        writer.write(fd, 0, torch.zeros(WRITE_PIECE_BYTES + 1, dtype=torch.uint8))
        with pytest.raises(DeployError, match="writing a shard failed"):
            writer.flush()
    finally:
        writer.close()
        os.close(fd)


def test_cut_into_shards_and_names():
    specs = [TensorSpec(str(i), torch.int8, (n,)) for i, n in enumerate([40, 50, 200, 10, 10])]
    shards = cut_into_shards(specs, 100)
    assert [[s.name for s in shard] for shard in shards] == [["0", "1"], ["2"], ["3", "4"]]
    assert shard_names(3) == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                              "model-00003-of-00003.safetensors"]


@pytest.mark.parametrize("bits,granularity", [(8, per_channel()), (4, per_group(32))])
def test_weight_check_is_the_comparison_of_the_dequantized_weight(bits, granularity):
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(1)).bfloat16()
    quantizer = WeightQuantizer(weight.shape, bits, granularity, lwc=True)
    with torch.no_grad():
        quantizer.upbound_factor.uniform_(-1.0, 2.0)
    check, from_levels, workspace = WeightCheck("layer", bits, Workspace()), WeightCheck("layer", bits), Workspace()
    in_levels = WeightCheck("layer", bits)
    for chunk in iter_weight_chunks(quantizer, weight, chunk_elements=500, workspace=workspace):
        assert torch.equal(chunk.levels, chunk.codes.float())
        check.update(chunk.weight, chunk.codes, chunk.scale)
        from_levels.update(chunk.weight, chunk.levels, chunk.scale)
        in_levels.update(chunk.weight, chunk.levels, chunk.scale, overwrite=True)  # the error formed in the levels
        assert not torch.equal(chunk.levels, chunk.codes.float())
    result = check.result()
    assert from_levels.result() == result and in_levels.result() == result
    x, r = weight.double(), quantizer.dequantize_weight(*quantizer.quantize_weight(weight)).double()
    cosine = float((x * r).sum() / (x.norm() * r.norm()))
    assert result.cosine == pytest.approx(cosine, abs=1e-6)
    assert result.rel_err == pytest.approx(float((x - r).norm() / x.norm()), rel=1e-4)
    assert result.mean_abs_err == pytest.approx(float((x - r).abs().mean()), rel=1e-4)
    assert result.max_abs_err == pytest.approx(float((x - r).abs().max()), rel=1e-5)
    assert result.band == ("GOOD" if cosine >= BANDS[bits][0] else "WARN")


def test_weight_check_fails_broken_exports():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    quantizer = WeightQuantizer(weight.shape, 8, per_channel())
    codes, scale = quantizer.quantize_weight(weight)
    for bad_codes, bad_scale in ((codes, scale.flip(0)), (codes.flip(1), scale), (codes, scale * math.inf)):
        check = WeightCheck("broken", 8)
        check.update(weight, bad_codes, bad_scale)
        assert check.result().band == "FAIL"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_bf16_check_fails_on_any_non_finite_value(bad):
    values = torch.randn(8, 16).bfloat16()
    check = WeightCheck("w", 16)
    check.update_values(values)
    assert check.result().band == "GOOD"
    values[3, 5] = bad
    check.update_values(values)
    assert check.result().band == "FAIL"
