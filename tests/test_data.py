"""The data package's command line (python -m collab_fast.data: toy, check)."""

from collab_fast.data.__main__ import main as data_main


def test_data_cli(tmp_path, capsys):
    assert data_main(["toy", str(tmp_path / "t"), "--classes", "2", "--per-class", "2", "--size", "16"]) == 0
    assert data_main(["check", str(tmp_path / "t"), "--decode"]) == 0
    assert "0 bad" in capsys.readouterr().out
    (tmp_path / "t" / "train" / "class_000" / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert data_main(["check", str(tmp_path / "t")]) == 1
    assert "bad.JPEG: truncated JPEG" in capsys.readouterr().out


def test_toy_under_a_file_and_check_of_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert data_main(["toy", str(tmp_path / "f" / "toy"), "--classes", "2", "--per-class", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write the toy folder") and "\n" not in err
    assert data_main(["check", str(tmp_path / "f")]) == 2
