"""The trainer's configuration: one source for defaults and help, the generated command line, recipes."""

import dataclasses
import os
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
    (dict(seed=-1), r"--seed must be in \[0, 9223372036854775807\]"),
    (dict(momentum=1.0), r"--momentum must be in \[0, 1\)"),
    (dict(epochs=2.5), "--epochs must be an integer"),
    (dict(overwrite=True, resume="auto"), "give one of them"),
    # huge values overflowed in C++ (a traceback) or allocated: every integer has an upper bound
    (dict(batch_size=2**70), r"--batch-size must be in \[1, 1048576\]"),
    (dict(image_size=2**70), r"--image-size must be in \[8, 8192\]"),
    (dict(synthetic_steps=2**70), r"--synthetic-steps must be in \[1, 2147483647\]"),
    (dict(threads=2**70), r"--threads must be in \[1, 1024\]"),
    (dict(epochs=2**31), r"--epochs must be in \[1, 2147483647\]"),
    (dict(temperature=1e200), r"--temperature must be in \(0, 10000\]"),
])
def test_validation_happens_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig("digits", **kw)


def test_resolve_fills_defaults():
    cfg = config.resolve(TrainConfig("digits", epochs=9), cuda=False, world=2)
    assert cfg.lr == pytest.approx(0.2) and cfg.lr_milestones == [3.0, 6.0, 8.0] and cfg.image_size == 32
    assert cfg.amp == "off" and cfg.channels_last is False and cfg.output.endswith("digits_resnet50_hier4")
    # config.json records what was used: the loss's weights, an absolute run folder, the toy folder
    assert cfg.beta == 0.5 and cfg.soft_weight == 4.0 and os.path.isabs(cfg.output)
    toy = config.resolve(TrainConfig("toy", temperature=3.0, loss_weights=[1.0, 2.0]), cuda=False, world=1)
    assert toy.data and toy.beta is None and toy.soft_weight is None


def test_a_flag_error_is_the_line_and_a_pointer_to_help(capsys):
    # No 47-line usage block before the line that matters.
    with pytest.raises(SystemExit) as e:
        parse_config(["digits", "--lr", "abc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err == ["python -m collab_fast.train: error: argument --lr: expected a number, got 'abc'",
                   "(see python -m collab_fast.train --help)"]


def test_help_is_grouped_by_section():
    text = config.build_parser().format_help()
    heads = [ln for ln in text.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
    assert heads == ["options:"] + [f"{k} ({v}):" for k, v in config.SECTIONS.items()]
    loss = text[text.index("loss (") : text.index("optim (")]
    assert "--temperature" in loss and "--beta" in loss and "--lr " not in loss
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["section"] in config.SECTIONS, f.name


def test_external_archs_and_model_kwargs():
    cfg = TrainConfig("digits", arch="timm:convnext_tiny", model_kwargs="drop_path_rate=0.1,act_layer=gelu,x=True")
    assert config.parse_model_kwargs(cfg.model_kwargs) == {"drop_path_rate": 0.1, "act_layer": "gelu", "x": True}
    for kw, match in [(dict(arch="vgg16"), "--arch must be one of resnet18"),
                      (dict(arch="resnet50", model_kwargs="a=1"), "--model-kwargs is for timm: and torchvision:"),
                      (dict(arch="timm:resnet50", model_kwargs="a"), "expected K=V pairs"),
                      (dict(arch="resnet50", weights="timm"), "--weights timm .*needs --arch timm:NAME")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig("digits", **kw)
    assert config.resolve(TrainConfig("digits", arch="timm:resnet50"), cuda=False, world=1).output.endswith(
        "digits_timmresnet50_hier4")
