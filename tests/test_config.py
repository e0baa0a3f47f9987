"""The trainer's configuration: one source for defaults and help, the generated command line, recipes."""

import dataclasses
import inspect
import json
import os
import re
import shlex
import time

import pytest

from collab_fast import config
from collab_fast.config import TrainConfig, build_parser, parse_config, recipe_command
from collab_fast.data import DataConfig
from collab_fast.models import parse_model_kwargs
from collab_fast.recipes import RECIPES


def test_parser_is_generated_from_the_sections():
    # Every CLI setting of every section has exactly one flag, and parsing nothing but the data set gives the
    # sections' defaults; config.json's flat view gives the config back.
    parser = build_parser()
    dests = {a.dest for a in parser._actions} - {"help", "list_recipes", "config"}
    fields = {name for name, (_, f, _) in config.FLAT.items() if f.metadata["cli"]}
    assert dests == fields and "num_classes" in config.FLAT and "num_classes" not in dests
    assert parse_config(["digits"]) == TrainConfig.from_flags("digits") == TrainConfig(DataConfig("digits"))
    cfg = parse_config(["digits", "--temperature", "3", "--loss-weights", "1,2", "--lr", "0.5", "-b", "64"])
    assert TrainConfig.from_flags(**cfg.to_dict()) == cfg
    assert cfg.loss.weights == (1.0, 2.0) and cfg.optim.batch_size == 64 and cfg.to_dict()["loss_weights"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown setting 'temprature'"):
        TrainConfig.from_flags("digits", temprature=3)


def test_every_default_is_written_once():
    # The loss section is CollabLossParams itself: the trainer's default T is the library's.
    from collab_fast import CollabLossParams, fused_collab_loss

    assert TrainConfig.from_flags("digits").loss == CollabLossParams()
    assert inspect.signature(fused_collab_loss).parameters["temperature"].default == CollabLossParams().temperature
    assert config.FLAT["temperature"][0] == "loss" and config.FLAT["loss_weights"][1].name == "weights"
    for name, settings in RECIPES.items():  # recipes state only what differs from the defaults
        defaults = TrainConfig.from_flags(settings["dataset"], **({"data": "."} if settings["dataset"] != "digits"
                                                                 else {})).to_dict()
        same = [k for k, v in settings.items() if k != "dataset" and defaults[k] == v]
        assert not same, (name, same)


def test_help_shows_text_and_default_for_every_flag():
    parser = build_parser()
    for action in parser._actions:
        if action.dest in ("help", "list_recipes", "config"):
            continue
        assert action.help and len(action.help) > 10, action.dest
        f = config.FLAT[action.dest][1]
        has_default = f.default is not None or f.default_factory is not dataclasses.MISSING
        if has_default and action.dest != "dataset":
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
        assert cfg.to_dict()[k] == v, k
    assert "True" not in cmd and "False" not in cmd


def test_recipe_defaults_yield_to_explicit_flags(tmp_path):
    cfg = parse_config(["--recipe", "cifar-resnet32", "--data", str(tmp_path), "--epochs", "7", "--no-zero-init-residual"])
    assert cfg.optim.epochs == 7 and cfg.optim.lr == 0.1 and cfg.model.zero_init_residual is False
    assert cfg.run.recipe == "cifar-resnet32"


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
        TrainConfig.from_flags("digits", **kw)


def test_resolve_fills_defaults():
    cfg = config.resolve(TrainConfig.from_flags("digits", epochs=9), cuda=False, world=2)
    assert cfg.optim.lr == pytest.approx(0.2) and cfg.optim.lr_milestones == [3.0, 6.0, 8.0]
    assert cfg.data.image_size == 32 and cfg.data.augment == "crop"
    assert cfg.optim.amp == "off" and cfg.model.channels_last is False
    assert cfg.run.output.endswith("digits_resnet50_hier4")
    # config.json records what was used: the loss's weights, an absolute run folder, the toy folder
    assert cfg.loss.beta == 0.5 and cfg.loss.soft_weight == 4.0 and os.path.isabs(cfg.run.output)
    toy = config.resolve(TrainConfig.from_flags("toy", temperature=3.0, loss_weights=[1.0, 2.0]), cuda=False, world=1)
    assert toy.data.root and toy.loss.beta is None and toy.loss.soft_weight is None and toy.data.image_size == 224



def test_resolution_is_final_and_leaves_the_flags_alone(tmp_path):
    flags = TrainConfig.from_flags("digits", epochs=9)
    before = flags.to_dict()
    cfg = config.resolve(flags, cuda=False, world=1)
    assert flags.to_dict() == before and flags.optim.lr is None and flags.data.num_classes is None  # not mutated
    assert cfg.data.num_classes == 10 and cfg.optim.lr_milestones == [3.0, 6.0, 8.0]
    # the classes are known before loading: fixed by the set, or an image folder's train class folders
    for name, classes in [("cifar100", 100), ("fashion-mnist", 10), ("synthetic", 1000), ("toy", 10)]:
        assert config.resolve(TrainConfig.from_flags(name, data=str(tmp_path) if name == "cifar100" else None),
                              cuda=False, world=1).data.num_classes == classes, name
    for c in ("b", "a", "c"):
        (tmp_path / "img" / "train" / c).mkdir(parents=True)
    folder = config.resolve(TrainConfig.from_flags("imagenet", data=str(tmp_path / "img")), cuda=False, world=1)
    assert folder.data.num_classes == 3
    # a resumed run's checkpoint joins the resolution: default milestones keep the ones it was trained with
    saved = {"schedule": "step", "lr_milestones": [2.0, 4.0]}
    assert config.resolve(flags, cuda=False, world=1, resumed=saved).optim.lr_milestones == [2.0, 4.0]
    assert flags.optim.lr_milestones == []


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
    assert heads == ["options:"] + [f"{k} ({v}):" for k, (_, v) in config.SECTIONS.items()]
    loss = text[text.index("loss (") : text.index("optim (")]
    assert "--temperature" in loss and "--beta" in loss and "--loss-weights" in loss and "--lr " not in loss


def test_external_archs_and_model_kwargs():
    cfg = TrainConfig.from_flags("digits", arch="timm:convnext_tiny",
                                 model_kwargs="drop_path_rate=0.1,act_layer=gelu,x=True")
    assert parse_model_kwargs(cfg.model.model_kwargs) == {"drop_path_rate": 0.1, "act_layer": "gelu", "x": True}
    for kw, match in [(dict(arch="vgg16"), "--arch must be one of resnet18"),
                      (dict(arch="resnet50", model_kwargs="a=1"), "--model-kwargs is for timm: and torchvision:"),
                      (dict(arch="timm:resnet50", model_kwargs="a"), "expected K=V pairs"),
                      (dict(arch="resnet50", weights="timm"), "--weights timm .*needs --arch timm:NAME")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_flags("digits", **kw)
    resolved = config.resolve(TrainConfig.from_flags("digits", arch="timm:resnet50"), cuda=False, world=1)
    assert resolved.run.output.endswith("digits_timmresnet50_hier4")


def test_config_file_flat_or_by_section_under_the_flags(tmp_path):


    (tmp_path / "a.yaml").write_text("dataset: digits\noptim:\n  lr: 0.3\n  opt: lamb\nloss:\n  temperature: 4\n"
                                     "mixup: 0.2\n")
    cfg = parse_config(["--config", str(tmp_path / "a.yaml"), "--temperature", "5"])
    assert (cfg.data.dataset, cfg.optim.lr, cfg.optim.optimizer, cfg.loss.temperature, cfg.data.mixup) == \
        ("digits", 0.3, "lamb", 5.0, 0.2)  # the flag wins over the file
    # a run's own config.json reproduces its settings, but for where it writes and whether it starts over
    first = TrainConfig.from_flags("digits", lr=0.2, loss_weights=[1, 3], pattern="ilr2", epochs=7)
    (tmp_path / "config.json").write_text(json.dumps(first.to_dict()))
    assert parse_config(["--config", str(tmp_path / "config.json")]).to_dict() == first.to_dict()


@pytest.mark.parametrize("given", [dict(output="OLD", overwrite=True), dict(output="OLD", resume="auto"),
                                   dict(overwrite=True)])
def test_config_file_never_says_where_to_write_or_to_overwrite(tmp_path, capsys, given):
    # A run's config.json names that run's folder (and maybe overwrite: true): an experiment started from it
    # must not write into, or delete, that run. Those settings come from the command line only, and the
    # file's are ignored aloud.
    given = {k: str(tmp_path / v) if k == "output" else v for k, v in given.items()}
    (tmp_path / "old.json").write_text(json.dumps({**TrainConfig.from_flags("digits").to_dict(), **given}))
    cfg = parse_config(["--config", str(tmp_path / "old.json")])
    assert (cfg.run.output, cfg.run.overwrite, cfg.run.resume) == (None, False, None)
    err = capsys.readouterr().err
    assert f"--config {tmp_path / 'old.json'}: ignoring {', '.join(given)} (" in err, err
    assert "come from the command line only" in err
    cfg = parse_config(["--config", str(tmp_path / "old.json"), "--output", str(tmp_path / "new")])
    assert cfg.run.output == str(tmp_path / "new") and not cfg.run.overwrite  # the flag, not the file


_ALIAS_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
               "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
               "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
               "lr: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n")


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "bomb.yaml", "expands to more than 10000 values"),
    (lambda d: "/dev/zero", "larger than 1 MiB"),
    (lambda d: d / "big.json", "larger than 1 MiB"),
    (lambda d: d / "long.json", "a value of 5000 characters"),
])
def test_config_files_are_bounded(tmp_path, capsys, make, match):
    (tmp_path / "bomb.yaml").write_text(_ALIAS_BOMB)  # 9^7 = 4.8 million values from a few hundred bytes
    (tmp_path / "big.json").write_text('{"lr": 0.1' + " " * (1 << 20) + "}")
    (tmp_path / "long.json").write_text(json.dumps({"arch": "a" * 5000}))
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        parse_config(["digits", "--config", str(make(tmp_path))])
    assert e.value.code == 2 and time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and re.search(match, err[0]) and len(err[0]) < 400, err
    # the file's recipe applies under the file
    (tmp_path / "r.json").write_text(json.dumps({"recipe": "cifar-resnet32", "epochs": 3}))
    cfg = parse_config(["--config", str(tmp_path / "r.json"), "--data", str(tmp_path)])
    assert cfg.run.recipe == "cifar-resnet32" and cfg.optim.epochs == 3 and cfg.data.dataset == "cifar10"


@pytest.mark.parametrize("text, name, match", [
    ("{", "bad.json", r"--config .*bad.json: not valid JSON"),
    ("a: [1", "bad.yaml", r"--config .*bad.yaml: not valid YAML"),
    ("[1, 2]", "list.json", "expected a mapping of settings, got a list"),
    ('{"lrr": 0.1}', "typo.json", "unknown setting 'lrr'"),
    ('{"optim": {"temperature": 2}}', "sec.json", "optim.temperature is not a setting of the optim section"),
    ('{"dataset": "digits", "lr": -1}', "range.json", "--lr must be in"),
    (None, "missing.json", r"--config .*missing.json: cannot read it"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, name, match):


    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_config(["digits", "--config", str(tmp_path / name)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and re.search(match, err[0]), err
