"""The trainer's configuration: one source for defaults and help, the generated command line, recipes."""

import dataclasses
import shlex

import pytest

from collab_fast import config
from collab_fast.config import TrainConfig, build_parser, parse_config, recipe_command
from collab_fast.recipes import RECIPES


def test_parser_is_generated_from_the_dataclass():
    # Every CLI field has exactly one flag, and parsing nothing but the data set gives the dataclass defaults.
    parser = build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "list_recipes"}
    fields = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)}
    assert dests == fields
    assert parse_config(["digits"]) == TrainConfig("digits")


def test_help_shows_text_and_default_for_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.dest in ("help", "list_recipes"):
            continue
        assert action.help and len(action.help) > 10, action.dest
        f = next(f for f in dataclasses.fields(TrainConfig) if f.name == action.dest)
        has_default = f.default is not None or f.default_factory is not dataclasses.MISSING
        if has_default and f.name != "dataset":
            assert "(default:" in action.help, action.dest
    text = parser.format_help()
    for flag in ("--epochs", "--momentum", "--wd", "--temperature", "--beta", "--image-size", "--output",
                 "--log-every", "--eval-every", "--compile"):
        assert flag in text


@pytest.mark.parametrize("name", list(RECIPES))
def test_list_recipes_prints_runnable_command_lines(name, tmp_path):
    cmd = recipe_command(name)
    argv = shlex.split(cmd)[3:]  # after "python -m collab_fast.train"
    if "--data" not in argv and RECIPES[name].get("dataset") in ("cifar10", "cifar100", "imagenet"):
        argv += ["--data", str(tmp_path)]
    cfg = parse_config(argv)
    for k, v in RECIPES[name].items():
        assert getattr(cfg, k) == v, k
    assert "True" not in cmd and "False" not in cmd


def test_recipe_defaults_yield_to_explicit_flags(tmp_path):
    cfg = parse_config(["--recipe", "cifar-resnet32", "--data", str(tmp_path), "--epochs", "7", "--no-zero-init-residual"])
    assert cfg.epochs == 7 and cfg.lr == 0.1 and cfg.zero_init_residual is False and cfg.recipe == "cifar-resnet32"


@pytest.mark.parametrize("kw, match", [
    (dict(lr=float("nan")), "--lr must be a finite number"),
    (dict(warmup_epochs=-5.0), r"--warmup-epochs must be in \[0, inf\)"),
    (dict(seed=-1), r"--seed must be in \[0, inf\)"),
    (dict(momentum=1.0), r"--momentum must be in \[0, 1\)"),
    (dict(epochs=2.5), "--epochs must be an integer"),
    (dict(overwrite=True, resume="auto"), "give one of them"),
])
def test_validation_happens_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig("digits", **kw)


def test_resolve_fills_defaults():
    cfg = config.resolve(TrainConfig("digits", epochs=9), cuda=False, world=2)
    assert cfg.lr == pytest.approx(0.2) and cfg.lr_milestones == [3.0, 6.0, 8.0] and cfg.image_size == 32
    assert cfg.amp == "off" and cfg.channels_last is False and cfg.output.endswith("digits_resnet50_hier4")
