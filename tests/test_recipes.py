"""collab_fast.recipes: the named settings (the paper's and a modern one), listed and overridden by flags."""

import pytest

from collab_fast import train


def test_recipes_list_and_override(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(["--list-recipes"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("imagenet-resnet50", "cifar-resnet32", "cifar-resnet110", "cifar-densenet40", "cifar10-densenet40-tf",
                 "label-noise"):
        assert name in out
    cfg = train.parse_config(["--recipe", "cifar10-densenet40-tf", "--data", "/tmp", "--epochs", "7"])
    got = (cfg.data.dataset, cfg.model.arch, cfg.model.pattern, cfg.optim.batch_size, cfg.loss.soft_weight)
    assert got == ("cifar10", "densenet40_12", "hier4", 64, 1.0)
    assert cfg.optim.lr_milestones == [150, 225, 290] and cfg.optim.epochs == 7 and cfg.run.recipe == "cifar10-densenet40-tf"
    cfg = train.parse_config(["digits", "--recipe", "label-noise", "--label-noise", "0.4"])
    assert cfg.data.dataset == "digits" and cfg.data.label_noise == 0.4 and cfg.model.arch == "resnet32"
    with pytest.raises(SystemExit):
        train.parse_config(["--recipe", "nope"])
    with pytest.raises(SystemExit):
        train.parse_config([])  # no data set and no recipe
