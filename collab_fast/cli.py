"""What the command lines share: `setting`, the metadata that makes a dataclass field a flag (its help text,
choices and valid range), and `Parser`, whose error is the one line that matters and a pointer to --help,
not the whole usage block first. The sections that own the trainer's settings (data.DataConfig,
models.ModelConfig, CollabLossParams, optim.OptimConfig, run_state.RunConfig) declare their fields with
`setting`; collab_fast.config composes them and generates the flat command line."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import field

__all__ = ["Parser", "base_type", "check_fields", "check_values", "flag", "flat_name", "range_text", "setting",
           "setting_specs", "settings"]

INT_MAX = 2**31 - 1  # the bound of an integer setting without its own: counts, sizes and steps that torch and the
# data loaders take as 32-bit or allocate from (2^70 overflowed in C++ with a traceback)


def setting(default=None, help: str = "", *, choices=None, lo=None, hi=None, lo_open=False, hi_open=False,
        short: str | None = None, metavar: str | None = None, cli: bool = True, name: str | None = None):
    """A setting: its default (the only place it is written), help text, choices and valid range [lo, hi]
    (open ends as flagged). `name`: its name on the command line and in config.json where the field's own
    name would clash with another section's (the loss's `weights` is --loss-weights); cli=False: recorded
    in config.json but not a flag."""
    meta = dict(help=help, choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, short=short,
                metavar=metavar, cli=cli, name=name)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """A setting's flag: its (flat) name with dashes."""
    return "--" + name.replace("_", "-")


def flat_name(f: dataclasses.Field) -> str:
    """A setting's name on the command line and in config.json."""
    return f.metadata.get("name") or f.name


def settings(cls) -> list[tuple[dataclasses.Field, object]]:
    """(field, type annotation) of each setting of a section class: its fields declared with `setting`."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def base_type(tp):
    """(scalar type, is a sequence) of an annotation such as `float | None`, `list[float]` or
    `tuple[float, float] | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, tuple):
        return args[0], True
    if args:
        return base_type(args[0])
    return tp, False


def _in_range(v, meta) -> bool:
    lo = -math.inf if meta["lo"] is None else meta["lo"]
    hi = math.inf if meta["hi"] is None else meta["hi"]
    return (v > lo if meta["lo_open"] else v >= lo) and (v < hi if meta["hi_open"] else v <= hi)


def range_text(meta, base=float) -> str:
    num = lambda v: str(v) if isinstance(v, int) else f"{v:g}"
    hi = INT_MAX if base is int and meta["hi"] is None else meta["hi"]
    lo = "-inf" if meta["lo"] is None else num(meta["lo"])
    left = "(" if meta["lo_open"] or meta["lo"] is None else "["
    right = ")" if meta["hi_open"] or hi is None else "]"
    return f"{left}{lo}, {'inf' if hi is None else num(hi)}{right}"


def setting_specs(cls) -> tuple:
    """Each setting of section `cls` as plain values: (field name, flat name, scalar type, is a sequence,
    metadata dict). A section built inside torch.compile'd code (the loss's) computes them once at import
    and passes them to check_values: typing's introspection is not traceable."""
    return tuple((f.name, flat_name(f), *base_type(tp), dict(f.metadata)) for f, tp in settings(cls))


def check_values(cls, values: dict, *, names: str = "flag", specs: tuple | None = None) -> None:
    """Type, choices and range of each setting of section `cls` present in `values` (keyed by field name):
    the one check of every setting, whatever the entry point. names="flag": errors name the flag and are
    ValueErrors (the command line, config files); "field": they name the argument, and a value of the
    wrong type is a TypeError (a library call)."""
    field_names = names == "field"
    for attr, flat, base, many, meta in setting_specs(cls) if specs is None else specs:
        v = values.get(attr)
        if v is None:
            continue
        name = attr if field_names else flag(flat)
        wrong_type = TypeError if field_names else ValueError
        if many and not isinstance(v, (list, tuple)):
            raise wrong_type(f"{name} must be a list of numbers, got {v!r}")
        for x in (v if many else [v]):
            if base is float and (isinstance(x, bool) or not isinstance(x, (int, float))):
                raise wrong_type(f"{name} must be a finite number, got {x!r}")
            # x - x == 0 is false exactly for inf and nan; math.isfinite breaks a torch.compile(dynamic=True) graph
            if base is float and not x - x == 0:
                raise ValueError(f"{name} must be a finite number, got {x!r}")
            if base is int and (isinstance(x, bool) or not isinstance(x, int)):
                raise wrong_type(f"{name} must be an integer, got {x!r}")
            if base is bool and not isinstance(x, bool):
                raise wrong_type(f"{name} must be {'True or False' if field_names else 'true or false'}, got {x!r}")
            if base is str and not isinstance(x, str):
                raise wrong_type(f"{name} must be a string, got {x!r}")
            if meta["choices"] is not None and x not in meta["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {x!r}")
            if ((meta["lo"] is not None or meta["hi"] is not None) and not _in_range(x, meta)
                    or base is int and meta["hi"] is None and abs(x) > INT_MAX):
                raise ValueError(f"{name} must be in {range_text(meta, base)}, got {x}")


def check_fields(section) -> None:
    """check_values on a section object's own fields (its __post_init__)."""
    check_values(type(section), vars(section))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)
