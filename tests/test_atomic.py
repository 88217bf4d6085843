"""sslaudio.atomic: a failed write leaves neither a partial file nor a temp file behind."""

import os
import stat

import pytest

from sslaudio.atomic import atomic_text, atomic_write


def _fail_after_writing(exc: type[BaseException]):
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("partial")
        raise exc("boom")

    return write


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path, exc):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(exc, match="boom"):
        atomic_write(target, _fail_after_writing(exc))
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no .out.json.*.tmp either


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_keeps_the_existing_file(tmp_path, exc):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(exc, match="boom"):
        atomic_write(target, _fail_after_writing(exc))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_text(target, "one")
    atomic_text(target, "two")
    atomic_write(tmp_path / "c.bin", lambda t: open(t, "wb").write(b"\x00\x01"))
    assert target.read_text() == "two" and (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.txt", "c.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permissions_match_the_writes_they_replaced(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    atomic_text(tmp_path / "text.txt", "x")
    atomic_write(tmp_path / "private.bin", lambda t: open(t, "wb").close())
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode["text.txt"] == mode["plain.txt"]  # as Path.write_text: 0o666 & ~umask
    assert mode["private.bin"] == 0o600  # tempfile.mkstemp's, as features / checkpoints always had
