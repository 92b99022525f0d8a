"""cores.utils.io: the one atomic write, temporary names."""

import pytest

from cores.utils.io import atomic_file, atomic_write_text, is_temp


def test_atomic_file_renames_on_success_and_removes_on_error(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    with atomic_file(path) as tmp:
        assert is_temp(tmp) and tmp.parent == path.parent
        tmp.write_bytes(b"new")
        assert not path.exists()
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"new" and sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]
    atomic_write_text(path, "text")
    assert path.read_text() == "text" and len(list(path.parent.iterdir())) == 1
