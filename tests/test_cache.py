"""cache.py: where builds and generated data go."""

from pathlib import Path

from collab_fast.cache import cache_root


def test_the_variable_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLAB_FAST_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("COLLAB_FAST_CACHE", "")  # empty: unset
    assert cache_root() == tmp_path / "xdg" / "collab_fast"
    monkeypatch.delenv("COLLAB_FAST_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == Path(tmp_path / "home" / ".cache" / "collab_fast")
