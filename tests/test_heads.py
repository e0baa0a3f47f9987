"""models/heads.py: the one-head interface every network answers (num_heads, loss_factor, export_head)."""

import pytest
import torch
from torch import nn

from collab_fast.models import cifar
from collab_fast.models.heads import as_heads, single_head


def test_as_heads_gives_every_pattern_the_same_shape_as_a_view():
    two = torch.randn(4, 3)
    three = torch.randn(2, 4, 3)
    assert as_heads(two).shape == (1, 4, 3) and as_heads(two).data_ptr() == two.data_ptr()
    assert as_heads(three) is three


def test_a_built_in_network_exports_a_copy_of_itself():
    net = cifar.resnet32()
    assert net.num_heads == 1 and net.loss_factor == 1.0
    copy = net.export_head(0)
    assert type(copy) is type(net) and copy is not net
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), net.state_dict().values()))
    for bad in (1, -1, True):
        with pytest.raises(ValueError, match="head must be 0 for a single network"):
            net.export_head(bad)


def test_a_foreign_network_gets_the_interface_in_place_and_a_clash_is_refused():
    net = nn.Linear(3, 2)
    assert single_head(net) is net and net.num_heads == 1 and net.loss_factor == 1.0
    assert type(net) is nn.Linear and set(net.state_dict()) == {"weight", "bias"}
    assert isinstance(net.export_head(0), nn.Linear) and net.export_head(0) is not net
    assert single_head(net) is net  # again: nothing changes

    class Owns(nn.Linear):
        num_heads = 3

    with pytest.raises(ValueError, match="Owns has an attribute 'num_heads' of its own"):
        single_head(Owns(3, 2))
