"""tools.outputs: checks on where a command will write, made before any work."""

from __future__ import annotations

import pytest

from tools.outputs import check_writable_dir


def test_check_writable_dir_can_leave_no_trace(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b", keep=False) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # both levels it created are gone again
    (tmp_path / "kept").mkdir()
    check_writable_dir(tmp_path / "kept", keep=False)
    check_writable_dir(tmp_path / "made")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "made"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .*file/sub: cannot write there"):
        check_writable_dir(tmp_path / "file" / "sub", keep=False)
