"""collab_fast.extras: a missing optional dependency is one line naming what to install."""

import sys

import pytest

from collab_fast.data import dali
from collab_fast.extras import MissingExtra, require


def test_missing_dali_is_one_readable_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import fails, as where DALI is not installed
    with pytest.raises(MissingExtra) as e:
        dali._dali()
    msg = str(e.value)
    assert msg == ("--loader dali needs NVIDIA DALI, which is not installed: pip install 'collab_fast[dali]'; or "
                   "'collab_fast[dali-cuda12]' for a CUDA 12 driver; --loader torch reads image folders without DALI")


def test_package_names_and_a_module_that_fails_to_import(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(MissingExtra, match=r"^writing needs Pillow, which is not installed: pip install "
                                           r"'collab_fast\[train\]'$"):
        require("PIL.Image", "train", "writing")
    (tmp_path / "broken_extra_mod.py").write_text("raise ImportError('libfoo.so: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtra, match=r"needs broken_extra_mod, which does not import here \(libfoo.so"):
        require("broken_extra_mod", "train", "x")
    assert require("math", "train", "x").sqrt(4) == 2
