"""models/cost.py: FLOPs per stage and the cost of each pattern against the single network."""

import pytest

from collab_fast.models.cost import child_flops, pattern_cost


def test_resnet50_stage_fractions_match_paper_readme():
    flops = child_flops("resnet50", 224)
    total = sum(flops.values())
    frac = {k: 100 * v / total for k, v in flops.items()}
    stem = frac["conv1"] + frac["bn1"] + frac["relu"] + frac["maxpool"]
    for got, want in [(stem, 2.9), (frac["layer1"], 16.3), (frac["layer2"], 25.1), (frac["layer3"], 35.8),
                      (frac["layer4"], 19.8)]:
        assert abs(got - want) < 0.1
    assert abs(total / 2 / 1e9 - 4.09) < 0.02  # 4.09 GMACs per image


def test_pattern_cost_ratios():
    hier4 = pattern_cost("resnet50", "hier4")
    assert abs(hier4.flops_ratio - 1.95) < 0.01 and hier4.heads == 4
    assert pattern_cost("resnet50", "inst2").flops_ratio == pytest.approx(2.0)
    assert pattern_cost("resnet50", "single").params == 25_557_032
    assert 1.5 < pattern_cost("resnet50", "ilr2").flops_ratio < 1.6
    assert "1.95x single" in hier4.line()
