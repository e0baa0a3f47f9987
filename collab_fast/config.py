"""The trainer's configuration: five sections, each owned by its component and declared there with
`collab_fast.cli.setting` (the only place a default, a valid range and a help text live):

    data   collab_fast.data.DataConfig        the data set and its loading
    model  collab_fast.models.ModelConfig     the network, head pattern and initial weights
    loss   collab_fast.CollabLossParams       the collaborative loss (what fused_collab_loss takes)
    optim  collab_fast.optim.OptimConfig      batch, schedule, optimizer, precision
    run    collab_fast.run_state.RunConfig    run folder, resumption, seed, logging, devices

composed here into `TrainConfig`. The command line, config.json and the recipes see the settings flat, by
name (`--temperature`, "temperature"); `TrainConfig.from_flags` and `to_dict` convert. Each section
validates itself when built; TrainConfig adds the checks that involve several.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from collab_fast.cli import Parser, base_type, flag, flat_name, range_text, settings
from collab_fast.data import DataConfig
from collab_fast.extras import MissingExtra, require
from collab_fast.kernels.collab_loss import CollabLossParams
from collab_fast.kernels.collab_loss.params import validate_settings
from collab_fast.models import ModelConfig
from collab_fast.optim import OptimConfig
from collab_fast.recipes import RECIPES
from collab_fast.run_state import RunConfig

__all__ = ["SECTIONS", "TrainConfig", "build_parser", "parse_config", "recipe_command", "resolve"]

SECTIONS = {  # section name -> (its class, what --help says of it)
    "data": (DataConfig, "data set, augmentation and loading"),
    "model": (ModelConfig, "network, head pattern and initial weights"),
    "loss": (CollabLossParams, "collaborative loss (collab_fast.CollabLossParams)"),
    "optim": (OptimConfig, "optimisation and schedule"),
    "run": (RunConfig, "run folder, checkpoints, logging and devices"),
}


def _flat() -> dict[str, tuple[str, dataclasses.Field, object]]:
    """flat name -> (section, field, type) of every setting, in --help order."""
    out: dict = {}
    for section, (cls, _) in SECTIONS.items():
        for f, tp in settings(cls):
            assert flat_name(f) not in out, f"two settings named {flat_name(f)}"
            out[flat_name(f)] = (section, f, tp)
    return out


FLAT = _flat()


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: CollabLossParams = field(default_factory=CollabLossParams)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        for name, (cls, _) in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.data.dataset is None:
            raise ValueError("the data set is required (e.g. digits, imagenet), unless a --recipe sets it")
        if self.run.eval_only and not (self.model.weights or self.run.resume):  # (pretrained weights count)
            raise ValueError("--eval-only needs --weights PATH or --resume")

    @classmethod
    def from_flags(cls, dataset: str | None = None, /, **flags) -> TrainConfig:
        """TrainConfig("digits", lr=0.1, temperature=3) style: the settings by their flat names (those of the
        flags, config.json and the recipes); the rest keep their defaults. Raises ValueError naming the flag."""
        if dataset is not None:
            flags["dataset"] = dataset
        values: dict[str, dict] = {name: {} for name in SECTIONS}
        for name, v in flags.items():
            if name not in FLAT:
                raise ValueError(f"unknown setting {name!r} (see python -m collab_fast.train --help)")
            section, f, _ = FLAT[name]
            values[section][f.name] = v
        loss = values["loss"]
        if isinstance(loss.get("weights"), (list, tuple)) and len(loss["weights"]) == 0:  # config.json's "no weights"
            loss["weights"] = None
        validate_settings(loss, names="flag")  # first: the flags' names, not the library's, in an error
        if loss.get("weights") is not None:
            loss["weights"] = tuple(loss["weights"])
        return cls(**{name: SECTIONS[name][0](**kw) for name, kw in values.items()})

    def to_dict(self) -> dict:
        """The settings flat, by name (config.json; from_flags(**to_dict()) gives this config back)."""
        out = {}
        for name, (section, f, _) in FLAT.items():
            v = getattr(getattr(self, section), f.name)
            out[name] = list(v) if isinstance(v, (list, tuple)) else v
        out["loss_weights"] = out["loss_weights"] or []
        return out


def resolve(cfg: TrainConfig, *, cuda: bool, world: int, resumed: dict | None = None) -> TrainConfig:
    """Fills every unset (None, "auto") default from the device, the process count, the data set and, for a
    resumed run, the checkpoint's resolved settings (`resumed`; each section's own rule), and the run folder
    from the data set, arch and pattern. Returns a new config: `cfg` is left as it was, and the result is
    final (nothing changes it after)."""
    cfg = dataclasses.replace(cfg)
    cfg.data = cfg.data.resolved()
    cfg.optim = cfg.optim.resolved(cuda=cuda, world=world, resumed=resumed)
    if cfg.model.channels_last is None:
        cfg.model = dataclasses.replace(cfg.model, channels_last=cuda)
    cfg.model.check_capture(cuda=cuda, world=world)
    output = cfg.run.output
    if output is None:
        output = str(Path("runs") / f"{cfg.data.dataset}_{cfg.model.arch}_{cfg.model.pattern}".replace(":", ""))
    cfg.run = dataclasses.replace(cfg.run, output=str(Path(output).absolute()))  # paths hold from any folder
    return cfg


# ----------------------------------------------------------------------------------------------------
# command line, generated from the fields
# ----------------------------------------------------------------------------------------------------


def _parse_list(base):
    def parse(text: str):
        try:
            return [base(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    return parse


def _parse_scalar(base):
    def parse(text: str):
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if base is int else 'a number'}, "
                                             f"got {text!r}") from None
    parse.__name__ = base.__name__
    return parse


def _default_text(f) -> str:
    d = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if d is None:
        return ""
    if isinstance(d, bool):
        return f" (default: {'on' if d else 'off'})"
    if isinstance(d, list):
        return f" (default: {','.join(map(str, d)) or 'none'})"
    return f" (default: {d})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m collab_fast.train", usage="%(prog)s [DATASET] [flags by section, below]", description=(
        "Train a collaborative network (Song & Chai 2018): several heads of one network learning from the "
        "label and from each other; one head is exported for inference."))
    p.add_argument("--list-recipes", action="store_true", help="print each recipe as a runnable command line, then exit")
    p.add_argument("--config", metavar="FILE", help="settings from a JSON or YAML file: flat by flag name (as a run's "
                   "config.json) or by section ({optim: {lr: 0.1}}); over a --recipe, under the flags given here")
    groups = {name: p.add_argument_group(f"{name} ({text})") for name, (_, text) in SECTIONS.items()}
    for name, (section, f, tp) in FLAT.items():
        meta = f.metadata
        if not meta["cli"]:
            continue
        g = groups[section]
        base, is_list = base_type(tp)
        text = meta["help"] + ("" if meta["lo"] is None and meta["hi"] is None or meta["choices"]
                               else f"; range {range_text(meta, base)}") + _default_text(f)
        if name == "dataset":
            g.add_argument("dataset", nargs="?", choices=meta["choices"], default=None, help=text.replace("%", "%%"))
            continue
        names = ([meta["short"]] if meta["short"] else []) + [flag(name)]
        kw = dict(dest=name, help=text.replace("%", "%%"), default=argparse.SUPPRESS)  # argparse formats help with %
        if base is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif is_list:
            g.add_argument(*names, type=_parse_list(base), metavar=meta["metavar"] or "A,B", **kw)
        else:
            g.add_argument(*names, type=_parse_scalar(base) if base is not str else str, choices=meta["choices"],
                           metavar=meta["metavar"], **kw)
    return p


def parse_config(argv=None) -> TrainConfig:
    """Command line -> validated TrainConfig: the sections' defaults, then the recipe's, then the flags."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("list_recipes"):
        print(describe_recipes())
        parser.exit(0)
    if args.get("dataset") is None:
        args.pop("dataset", None)
    path = args.pop("config", None)
    try:
        from_file = load_config_file(path) if path else {}
        ignored = [k for k in _COMMAND_LINE_ONLY if k in from_file and from_file.pop(k) not in (None, False)]
        if ignored:  # a run's config.json names that run's folder: a new run must not write into it unasked
            print(f"collab_fast: --config {path}: ignoring {', '.join(ignored)} (where a run writes, and whether it "
                  f"starts over or continues, come from the command line only: {', '.join(map(flag, ignored))})",
                  file=sys.stderr)
        recipe = args.get("recipe", from_file.get("recipe"))
        if recipe is not None and recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        settings_ = dict(RECIPES[recipe]) if recipe else {}  # the recipe, then the file, then the flags
        settings_.update(from_file)
        settings_.update(args)
        return TrainConfig.from_flags(**settings_)
    except ValueError as exc:
        parser.error(str(exc))


# Settings a config file does not give (parse_config ignores them, and says so): a run's config.json holds
# its own folder, and --overwrite there would delete that run.
_COMMAND_LINE_ONLY = ("output", "overwrite", "resume")
# What a config file may hold: a run's config.json is ~2 KB and ~60 values. The bounds stop a file that is
# not one (/dev/zero, a YAML alias bomb that expands a few hundred bytes to millions of values) early, and
# keep every error message about a value short.
_MAX_CONFIG_BYTES = 1 << 20
_MAX_CONFIG_VALUES = 10_000
_MAX_CONFIG_STRING = 4096


def _read_bounded(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(_MAX_CONFIG_BYTES + 1)
    if len(data) > _MAX_CONFIG_BYTES:
        raise ValueError(f"--config {path}: larger than {_MAX_CONFIG_BYTES >> 20} MiB; a config file holds a few "
                         "settings (a run's config.json is about 2 KB)")
    return data.decode("utf-8")


def _check_expansion(data, path: str) -> None:
    """Counts the values as they expand (a YAML alias counts each time it is used), up to the bound."""
    stack, count = [data], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > _MAX_CONFIG_VALUES:
            raise ValueError(f"--config {path}: expands to more than {_MAX_CONFIG_VALUES} values (YAML aliases "
                             "repeated?); a config file holds a few settings")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, (str, bytes)) and len(v) > _MAX_CONFIG_STRING:
            raise ValueError(f"--config {path}: a value of {len(v)} characters; no setting takes more than "
                             f"{_MAX_CONFIG_STRING}")


def load_config_file(path: str) -> dict:
    """--config FILE: a mapping of settings, flat by name or nested by section (keys of a section: its flat
    names or its field names). Returns the flat settings; ValueError naming the file for anything else."""
    p = Path(path)
    try:
        text = _read_bounded(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    try:
        yaml = require("yaml", "train", f"--config {path}") if is_yaml else None
    except MissingExtra as exc:
        raise ValueError(str(exc)) from None
    try:
        data = yaml.safe_load(text) if yaml is not None else json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: the parser's first line names the place
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--config {path}: not valid {'YAML' if is_yaml else 'JSON'} ({first})") from None
    if data is None:
        return {}
    _check_expansion(data, path)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings, got a {type(data).__name__}")
    by_field = {(section, f.name): name for name, (section, f, _) in FLAT.items()}
    out: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                name = k if k in FLAT and FLAT[k][0] == key else by_field.get((key, k))
                if name is None:
                    raise ValueError(f"--config {path}: {key}.{k} is not a setting of the {key} section (see --help)")
                out[name] = v
        elif key in FLAT:
            out[key] = value
        else:
            raise ValueError(f"--config {path}: unknown setting {key!r} (see python -m collab_fast.train --help)")
    if isinstance(out.get("loss_weights"), list) and not out["loss_weights"]:
        out["loss_weights"] = None
    return out


def recipe_command(name: str) -> str:
    """A recipe as the command line that runs it (flags in --help order)."""
    settings_ = RECIPES[name]
    parts = ["python -m collab_fast.train"]
    if "dataset" in settings_:
        parts.append(settings_["dataset"])
    for key in FLAT:
        if key == "dataset" or key not in settings_:
            continue
        v = settings_[key]
        if isinstance(v, bool):
            parts.append(flag(key) if v else "--no-" + key.replace("_", "-"))
        elif isinstance(v, list):
            parts.append(f"{flag(key)} {','.join(f'{x:g}' for x in v)}")
        else:
            parts.append(f"{flag(key)} {v:g}" if isinstance(v, float) else f"{flag(key)} {v}")
    return " ".join(parts)


def describe_recipes() -> str:
    """What --list-recipes prints: each recipe's runnable command line."""
    return "\n".join(f"{name}\n  {recipe_command(name)}" for name in RECIPES)
