"""collab_fast.cli: settings declared with `setting`, checked by type, choice and range, named by their flag."""

from dataclasses import dataclass

import pytest

from collab_fast.cli import INT_MAX, Parser, check_fields, flag, flat_name, range_text, setting, settings


@dataclass
class Section:
    rate: float = setting(0.5, "a rate", lo=0, hi=1, hi_open=True)
    count: int = setting(3, "a count", lo=1)
    mode: str = setting("a", "a mode", choices=("a", "b"))
    points: list[float] = setting([], "points")
    weights: tuple[float, float] | None = setting(None, "two weights", lo=0, name="loss_weights")
    internal: int = 0  # not a setting: no setting(...)

    def __post_init__(self):
        check_fields(self)


def test_settings_names_and_flags():
    names = [flat_name(f) for f, _ in settings(Section)]
    assert names == ["rate", "count", "mode", "points", "loss_weights"]
    assert flag("loss_weights") == "--loss-weights"
    assert Section().points == [] and Section().points is not Section().points  # a fresh list per instance


@pytest.mark.parametrize("kw, match", [
    (dict(rate=1.0), r"--rate must be in \[0, 1\), got 1.0"),
    (dict(rate=float("nan")), "--rate must be a finite number"),
    (dict(rate=True), "--rate must be a finite number"),
    (dict(count=0), r"--count must be in \[1, 2147483647\], got 0"),
    (dict(count=2**40), "--count must be in"),
    (dict(count=2.0), "--count must be an integer"),
    (dict(mode="c"), "--mode must be one of a, b, got 'c'"),
    (dict(points=1.0), "--points must be a list of numbers"),
    (dict(weights=(1.0, -1.0)), r"--loss-weights must be in \[0, inf\), got -1.0"),
])
def test_bad_values_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        Section(**kw)


def test_range_text():
    assert range_text(dict(lo=0, hi=None, lo_open=True, hi_open=False)) == "(0, inf)"
    assert range_text(dict(lo=None, hi=None, lo_open=False, hi_open=False), int) == f"(-inf, {INT_MAX}]"


def test_parser_error_is_the_line_and_a_pointer(capsys):
    p = Parser(prog="prog")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["prog: error: argument --n: invalid int value: 'x'",
                                                    "(see prog --help)"]
