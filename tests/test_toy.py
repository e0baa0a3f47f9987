"""data/toy.py: the generated toy image folder and its size argument."""

import pytest
from PIL import Image

from collab_fast.data import write_toy
from collab_fast.data.toy import parse_size


def test_toy_is_deterministic_and_sized(tmp_path, toy):
    again = write_toy(tmp_path / "again", classes=3, per_class=7, size="40x30", val_per_class=3)
    a = sorted(p.relative_to(toy) for p in toy.rglob("*.JPEG"))
    assert a == sorted(p.relative_to(again) for p in again.rglob("*.JPEG"))
    assert len(a) == 3 * 7 + 3 * 3
    for rel in a[:5]:
        assert (toy / rel).read_bytes() == (again / rel).read_bytes()
    with Image.open(toy / a[0]) as im:
        assert im.size == (40, 30) and im.mode == "RGB"


def test_parse_size():
    assert parse_size("160") == (160, 160) and parse_size("500x375") == (500, 375) and parse_size(64) == (64, 64)
    for bad in ("abc", "5x", "4x4", "1x2x3"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
