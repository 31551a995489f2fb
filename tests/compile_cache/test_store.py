"""Cache files: written whole or not at all, checked when read, listed and cleared."""

import warnings

import pytest

from fusecc.compile_cache.store import clear_entries, list_entries, parse_entry, read_entry, write_entry


def test_round_trip_and_overwrite_leave_no_temporary_files(tmp_path):
    write_entry(tmp_path, "k1", b"first", "one")
    write_entry(tmp_path, "k1", b"second payload", "two")  # another process finishing later
    assert read_entry(tmp_path, "k1") == b"second payload"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.fcc"]
    assert [(e.key, e.description) for e in list_entries(tmp_path)] == [("k1", "two")]


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_file_is_removed_with_a_warning(tmp_path, damage):
    path = write_entry(tmp_path, "k", bytes(range(256)) * 4, "x")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    elif damage == "flip":
        data[-1] ^= 1
    else:
        data[:6] = b"PICKLE"
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="discarding cache entry"):
        assert read_entry(tmp_path, "k") is None
    assert not path.exists()


def test_missing_entry_is_a_quiet_miss(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_entry(tmp_path / "absent", "k") is None


def test_parse_returns_the_header(tmp_path):
    path = write_entry(tmp_path, "k", b"abc", "what it is")
    header, payload = parse_entry(path.read_bytes())
    assert payload == b"abc" and header["description"] == "what it is" and header["size"] == 3


def test_clear_removes_entries_and_leftover_temporaries(tmp_path):
    write_entry(tmp_path, "a", b"1", "")
    write_entry(tmp_path, "b", b"2", "")
    (tmp_path / ".a.123.tmp").write_bytes(b"half")  # a writer killed mid-write
    (tmp_path / "unrelated.txt").write_text("keep")
    assert clear_entries(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated.txt"]
