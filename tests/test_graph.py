"""models/graph.py: segments cut from a network's traced graph."""

import pytest
import torch
from test_collab import PoolInCodeNet

from collab_fast.models import make_collaborative


def test_graph_segments_keep_the_targets_names_and_train_eval_code():
    from collab_fast.models.graph import GraphSegment

    model = make_collaborative(PoolInCodeNet, "ilr2", splits=["stages.1"], example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model.trunk, GraphSegment)
    assert sorted(model.trunk.state_dict()) == sorted(k for k in PoolInCodeNet().state_dict()
                                                      if k.startswith(("stem.", "stages.0.", "stages.1.")))
    assert "mean" in model.levels[0][1].code() and model.segment_names == [["stem", "stages.0", "stages.1"],
                                                                           ["stages.2", "stages.3", "classifier"]]
    import copy

    twin = copy.deepcopy(model)  # EMA and AveragedModel copy the model
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="split_by must be 'auto' or one of"):
        make_collaborative(PoolInCodeNet, "ilr2", splits=["stages.1"], split_by="fx")


def test_compile_a_traced_split_one_graph_no_breaks():
    torch._dynamo.reset()
    model = make_collaborative(PoolInCodeNet, "hier4", splits=["stages.1", "stages.2"],
                               example_input=torch.randn(2, 3, 8, 8))
    assert model.split_by == "graph"
    ex = torch._dynamo.explain(lambda a: model(a).square().sum())(torch.randn(4, 3, 8, 8))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
    torch._dynamo.reset()
