"""`fusecc cache list|clear`."""

from fusecc.cli import main
from fusecc.compile_cache.store import write_entry


def test_list_shows_entries_and_clear_removes_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path))
    write_entry(tmp_path / "graphs", "ab" * 32, b"x" * 2048, "12 Dynamo nodes, 3 inputs, cpu")
    write_entry(tmp_path / "functions", "cd" * 32, b"y", "function m.step")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "fused_pointwise_0.py").write_text("# kernel")
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert str(tmp_path) in listing and "12 Dynamo nodes, 3 inputs, cpu" in listing and "function m.step" in listing
    assert "abababababababab" in listing and "1 generated kernel sources" in listing
    assert main(["cache", "clear"]) == 0
    assert "removed 1 function, 1 graph and 1 kernel entries" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.fcc")) and not list(tmp_path.rglob("*.py"))
