"""cores.utils.safetensors_stream: safetensors files streamed piece by piece, renamed only when complete."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cores.utils.safetensors_stream import (
    WRITE_PIECE_BYTES,
    PieceWriter,
    StreamedFile,
    TensorSpec,
    safetensors_header,
)


def _tensors() -> dict[str, torch.Tensor]:
    """Names in sorted order within each element size, as ``save_file`` lays them out."""
    gen = torch.Generator().manual_seed(0)
    return {"a.scale": torch.rand(7, 1, generator=gen),
            "b.shape": torch.tensor([3, 9], dtype=torch.int32),
            "c.weight": torch.randn(3, 9, generator=gen).bfloat16(),
            "d.codes": torch.randint(-128, 128, (7, 5), generator=gen, dtype=torch.int8)}


def _stream(path, tensors, rows=2, **kwargs) -> StreamedFile:
    out = StreamedFile(path, [TensorSpec.of(k, v) for k, v in tensors.items()], **kwargs)
    for name, tensor in tensors.items():
        for lo in range(0, len(tensor), rows):
            out.write(name, tensor[lo:lo + rows])
    return out


def test_bytes_equal_safetensors_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    _stream(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"}).close()
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_metadata_last_is_the_dump_layout_and_reads_back(tmp_path):
    hidden = torch.randn(3, 4, 8).bfloat16()
    header, raw, offsets = safetensors_header([TensorSpec.of("hidden", hidden)], {"boundary": "2"},
                                              metadata_last=True)
    assert raw[8:].decode().rstrip() == ('{"hidden":{"dtype":"BF16","shape":[3,4,8],"data_offsets":[0,192]},'
                                         '"__metadata__":{"boundary":"2"}}')
    assert len(raw) % 8 == 0 and int.from_bytes(raw[:8], "little") == len(raw) - 8 and offsets == {"hidden": 0}
    _stream(tmp_path / "h.safetensors", {"hidden": hidden}, metadata={"boundary": "2"}, metadata_last=True).close()
    with safe_open(str(tmp_path / "h.safetensors"), "pt") as f:
        assert f.metadata() == {"boundary": "2"} and torch.equal(f.get_tensor("hidden"), hidden)


def test_pieces_that_do_not_fit_the_plan_are_refused(tmp_path):
    out = StreamedFile(tmp_path / "s.safetensors", [TensorSpec("w", torch.int8, (2, 4))])
    with pytest.raises(RuntimeError, match="plan has 8 bytes of torch.int8"):
        out.write("w", torch.zeros(2, 4))  # another dtype
    with pytest.raises(RuntimeError, match="not planned"):
        out.write("v", torch.zeros(1, 4, dtype=torch.int8))
    assert out.write("w", torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="after 8"):  # overruns the tensor
        out.write("w", torch.zeros(1, 4, dtype=torch.int8))
    out.close()


def test_the_file_appears_only_when_complete(tmp_path):
    path = tmp_path / "f.safetensors"
    seen = []
    out = StreamedFile(path, [TensorSpec("w", torch.int8, (2, 4))])
    out.write("w", torch.ones(1, 4, dtype=torch.int8))
    assert not path.exists() and out.tmp.is_file() and not out.complete
    with pytest.raises(RuntimeError, match=r"\['w'\] were not written whole"):
        out.close()
    assert not path.exists()
    out.abandon()
    assert not out.tmp.exists()

    with pytest.raises(KeyError), StreamedFile(path, [TensorSpec("w", torch.int8, (2, 4))]) as out:
        out.write("w", torch.ones(2, 4, dtype=torch.int8))
        raise KeyError("the producer failed")
    assert not path.exists() and not out.tmp.exists()  # abandoned: deleted

    out = _stream(path, {"w": torch.ones(2, 4, dtype=torch.int8)})
    out.close(sync=True, before_rename=lambda tmp: seen.append((tmp.stat().st_size, path.exists())))
    assert seen == [(out.size, False)] and path.stat().st_size == out.size and not out.tmp.exists()


def test_a_changed_file_is_not_renamed(tmp_path):
    path = tmp_path / "f.safetensors"
    out = _stream(path, {"w": torch.ones(2, 4, dtype=torch.int8)})
    with open(out.tmp, "ab") as f:
        f.write(b"x")
    with pytest.raises(RuntimeError, match="does not read back"):
        out.close()
    assert not path.exists()


def test_background_writer_keeps_order_and_reports_a_failed_write(tmp_path):
    data = torch.arange(3 * WRITE_PIECE_BYTES // 4 + 5, dtype=torch.int32)  # several pieces and a tail
    path, seen = tmp_path / "f", []
    writer = PieceWriter(background=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer.write(fd, 0, data)
        data_copy = data.clone()
        writer.write(fd, data.numel() * 4, data)
        data.zero_()  # copied before write() returned
        writer.submit(lambda: seen.append(path.stat().st_size))  # after the writes before it
        writer.flush()
    finally:
        os.close(fd)
    assert seen == [2 * data.numel() * 4]
    back = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.int32)
    assert torch.equal(back, torch.cat([data_copy, data_copy]))
    fd = os.open(path, os.O_RDONLY)
    try:
        writer.write(fd, 0, data)
        with pytest.raises(RuntimeError, match="writing a file failed"):  # at once, or once the write ran
            writer.submit(lambda: seen.append("skipped after the failure"))
            writer.flush()
    finally:
        writer.close()
        os.close(fd)
    assert len(seen) == 1
