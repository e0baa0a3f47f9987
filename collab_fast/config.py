"""The trainer's configuration: one typed dataclass, the only place a default, a valid range and a help
text live. The command line (`python -m collab_fast.train --help`), config.json, the recipes and
`--list-recipes` are generated from it, and it validates itself once, when it is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from collab_fast.cli import Parser
from collab_fast.data import DATASETS, default_augment, default_toy_dir
from collab_fast.models import ARCHS, EXTERNAL_PREFIXES
from collab_fast.models.collab import RESCALE_MODES, parse_pattern
from collab_fast.recipes import RECIPES

__all__ = ["TrainConfig", "build_parser", "parse_config", "recipe_command", "resolve"]

_INF = math.inf
_INT_MAX = 2**31 - 1  # the bound of an integer field without its own: counts, sizes and steps that torch and
# the data loaders take as 32-bit or allocate from (2^70 overflowed in C++ with a traceback)


SECTIONS = {  # the component that owns each field: --help lists the flags in these groups
    "data": "data set, augmentation and loading",
    "model": "network and head pattern",
    "loss": "collaborative loss (collab_fast.CollabLossParams)",
    "optim": "optimisation and schedule",
    "run": "run folder, checkpoints, logging and devices",
}


def opt(default=None, help: str = "", *, section: str, choices=None, lo=None, hi=None, lo_open=False,
        hi_open=False, short: str | None = None, metavar: str | None = None, cli: bool = True):
    """A config field: its owner (a SECTIONS key), default, help text, choices and valid range [lo, hi]
    (open ends as flagged)."""
    assert section in SECTIONS, section
    meta = dict(help=help, choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, short=short,
                metavar=metavar, cli=cli, section=section)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    dataset: str = opt(None, "the data set (a --recipe may set it)", choices=DATASETS, section="data")
    recipe: str | None = opt(None, "a paper setting (see --list-recipes); explicit flags override it",
                             choices=tuple(RECIPES), section="run")
    data: str | None = opt(None, "data directory: imagenet/toy DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG; "
                                 "cifar10/100 the extracted python batches; toy: generated when unset",
                           metavar="DIR", section="data")
    arch: str = opt("resnet50", f"network: {', '.join(ARCHS)}, or timm:NAME / torchvision:NAME (any model of those "
                                "libraries, where they import; split points found from its stages)", section="model")
    model_kwargs: str | None = opt(None, "keyword arguments of a timm: or torchvision: model's constructor, e.g. "
                                         "drop_path_rate=0.1,drop_rate=0.2", metavar="K=V,...", section="model")
    pattern: str = opt("hier4", "head pattern: single, inst2, inst4, inst:N, ilr2, hier4, tree:AxB...", section="model")
    num_classes: int | None = opt(None, "set from the data set", cli=False, section="data")
    batch_size: int = opt(256, "images per process and optimizer step (before --accum-steps)", lo=1, hi=2**20,
                          short="-b", section="optim")
    accum_steps: int = opt(1, "micro-batches per optimizer step (each takes every k-th sample, like DDP ranks)", lo=1,
                           section="optim")
    epochs: int = opt(90, "training epochs", lo=1, section="optim")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (tests, benchmarks)", lo=1, section="optim")
    lr: float | None = opt(None, "peak learning rate; unset: 0.1 x global batch / 256", lo=0, lo_open=True, section="optim")
    momentum: float = opt(0.9, "SGD momentum", lo=0, hi=1, hi_open=True, section="optim")
    wd: float = opt(1e-4, "weight decay (not on batch-norm parameters and biases)", lo=0, section="optim")
    nesterov: bool = opt(False, "Nesterov momentum", section="optim")
    schedule: str = opt("step", "learning-rate schedule: x0.1 at the milestones, or cosine to 0",
                        choices=("step", "cosine"), section="optim")
    lr_milestones: list[float] = opt([], "epochs of the x0.1 steps, e.g. 30,60,80; empty: 1/3, 2/3, 8/9 of the run",
                                     metavar="E1,E2,...", section="optim")
    warmup_epochs: float = opt(0.0, "linear learning-rate warm-up from 0, in epochs", lo=0, section="optim")
    temperature: float = opt(2.0, "T of the soft (consensus) objective", lo=0, hi=1e4, lo_open=True, section="loss")
    beta: float | None = opt(None, "weight of the hard (label) objective; the soft one gets 1 - beta; unset: 0.5",
                             lo=0, hi=1, section="loss")
    soft_weight: float | None = opt(None, "extra factor on the soft objective; unset: T^2 (the paper)", lo=0, section="loss")
    soft_loss: str = opt("ce", "soft objective: ce = CE(consensus, head) as in the paper, kl = KL(consensus || "
                               "head) as several public implementations write it", choices=("ce", "kl"), section="loss")
    loss_weights: list[float] = opt([], "free factors of the hard and the soft objective, replacing --beta and "
                                        "--soft-weight (e.g. 1,4 for CE + 4 KL)", lo=0, metavar="HARD,SOFT", section="loss")
    soft_ramp: float = opt(0.0, "epochs over which the soft objective's weight rises from near 0 to its full value "
                                "(exp(-5 (1 - t)^2), t = epoch / ramp, per step; Laine & Aila 2017): early consensus "
                                "of untrained heads is noise; 0: full weight from the start", lo=0, section="loss")
    detach_consensus: bool = opt(True, "the consensus is a constant target (no gradient through it)", section="loss")
    rescale: str = opt("backprop", "gradient rescaling at split points (the paper's Table 3 ablation)",
                       choices=RESCALE_MODES, section="model")
    zero_init_residual: bool = opt(True, "ResNets: each block's last BN scale starts at 0 (Goyal et al. 2017)",
                                   section="model")
    label_smoothing: float = opt(0.0, "label smoothing of the hard objective (torch's definition)", lo=0, hi=1,
                                 section="loss")
    label_noise: float = opt(0.0, "fraction of training labels redrawn uniformly every epoch (paper Fig. 3)",
                             lo=0, hi=1, hi_open=True, section="data")
    train_samples: int | None = opt(None, "train on a fixed, class-balanced subset of this many training samples (the "
                                          "same subset for every seed); unset: the whole training set", lo=1, section="data")
    holdout: int = opt(0, "hold this many training samples out (fixed, class-balanced, never trained on) and evaluate "
                          "on them instead of the test split: choose settings here, report on the test split", lo=0,
                       section="data")
    augment: str = opt("auto", "training augmentation: random crop + horizontal flip, crop only, or none; auto: "
                               "crop for digits (a mirrored digit is another digit), crop+flip otherwise. The "
                               "crop shifts by up to 1/8 of the side on device-resident sets",
                       choices=("auto", "crop+flip", "crop", "none"), section="data")
    image_size: int | None = opt(None, "training image size; unset: 224 for image folders, 32 for CIFAR/digits", lo=8,
                                 hi=8192, section="data")
    device: str = opt("auto", "where to train: auto (a CUDA device when present, one per process under torchrun), "
                              "cuda, or cpu (also where a GPU exists)", choices=("auto", "cuda", "cpu"), section="run")
    amp: str | None = opt(None, "autocast precision; unset: bf16 on CUDA, off on CPU", choices=("bf16", "fp16", "off"),
                          section="optim")
    channels_last: bool | None = opt(None, "channels-last memory format; unset: on with CUDA", section="model")
    compile: bool = opt(False, "torch.compile the model", section="model")
    output: str | None = opt(None, "run directory; unset: runs/<dataset>_<arch>_<pattern>", metavar="DIR", section="run")
    overwrite: bool = opt(False, "start over in an --output that holds an earlier run (its files are replaced)",
                          section="run")
    resume: str | None = opt(None, "continue a run: auto (OUTPUT/last.pt if present) or a checkpoint PATH",
                             metavar="auto|PATH", section="run")
    weights: str | None = opt(None, "initial weights: an exported head (.pth: into every copy of a collaborative "
                                    "pattern, the classifier re-initialised per head), a training checkpoint, or "
                                    "timm / torchvision (that library's pretrained weights, for its archs)",
                              metavar="PATH|timm|torchvision", section="run")
    seed: int = opt(0, "random seed (weights, data order, augmentation, label noise)", lo=0, hi=2**63 - 1, section="run")
    eval_only: bool = opt(False, "evaluate --weights (or the resumed checkpoint) and exit", section="run")
    log_every: int = opt(50, "optimizer steps between log records (the hot path's only host syncs)", lo=1, section="run")
    eval_every: int = opt(1, "epochs between evaluations", lo=1, section="run")
    save_every: int | None = opt(None, "optimizer steps between mid-epoch last.pt checkpoints (long epochs); unset: "
                                       "at each epoch end only", lo=1, section="run")
    skip_nonfinite: bool = opt(False, "skip steps whose loss is not finite (counted) instead of stopping", section="optim")
    skip_bad_images: bool = opt(False, "skip undecodable images (counted, named) instead of failing", section="data")
    loader: str = opt("auto", "image folders: dali (GPU decode and augmentation), torch (PyTorch workers with "
                              "Pillow: no DALI needed, slower), auto: dali where it is installed",
                      choices=("auto", "dali", "torch"), section="data")
    threads: int | None = opt(None, "DALI CPU threads or PyTorch loader workers; unset: min(8, CPU cores)", lo=1,
                              hi=1024, section="data")
    synthetic_steps: int = opt(100, "steps per epoch of the synthetic data set", lo=1, section="data")
    progress: str = opt("auto", "progress display: a bar on a terminal, a line every --progress-every seconds "
                                "otherwise (auto), or forced", choices=("auto", "bar", "lines", "off"), section="run")
    progress_every: float = opt(30.0, "seconds between progress lines when output is not a terminal",
                                lo=0, lo_open=True, section="run")

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fields():
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _base_type(tp):
    """(scalar type, is a list) of an annotation such as `float | None` or `list[float]`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return args[0], True
    if args:
        return _base_type(args[0])
    return tp, False


def _in_range(v, meta) -> bool:
    lo, hi = meta["lo"], meta["hi"]
    lo = -_INF if lo is None else lo
    hi = _INF if hi is None else hi
    ok_lo = v > lo if meta["lo_open"] else v >= lo
    ok_hi = v < hi if meta["hi_open"] else v <= hi
    return ok_lo and ok_hi


def _range_text(meta, base=float) -> str:
    num = lambda v: str(v) if isinstance(v, int) else f"{v:g}"
    hi = _INT_MAX if base is int and meta["hi"] is None else meta["hi"]
    lo = "-inf" if meta["lo"] is None else num(meta["lo"])
    left = "(" if meta["lo_open"] or meta["lo"] is None else "["
    right = ")" if meta["hi_open"] or hi is None else "]"
    return f"{left}{lo}, {'inf' if hi is None else num(hi)}{right}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """Every field's type, choices and range, then the checks that involve several fields or files.
    Raises ValueError naming the flag."""
    for f, tp in _fields():
        v, meta = getattr(cfg, f.name), f.metadata
        if v is None:
            continue
        base, is_list = _base_type(tp)
        for x in (v if is_list else [v]):
            if base is float and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)):
                raise ValueError(f"{flag(f.name)} must be a finite number, got {x!r}")
            if base is int and (isinstance(x, bool) or not isinstance(x, int)):
                raise ValueError(f"{flag(f.name)} must be an integer, got {x!r}")
            if base is bool and not isinstance(x, bool):
                raise ValueError(f"{flag(f.name)} must be true or false, got {x!r}")
            if meta["choices"] is not None and x not in meta["choices"]:
                raise ValueError(f"{flag(f.name)} must be one of {', '.join(map(str, meta['choices']))}, got {x!r}")
            if ((meta["lo"] is not None or meta["hi"] is not None) and not _in_range(x, meta)
                    or base is int and meta["hi"] is None and abs(x) > _INT_MAX):
                raise ValueError(f"{flag(f.name)} must be in {_range_text(meta, base)}, got {x}")
    if cfg.dataset is None:
        raise ValueError("the data set is required (e.g. digits, imagenet), unless a --recipe sets it")
    if cfg.arch not in ARCHS and not cfg.arch.startswith(EXTERNAL_PREFIXES):
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, or timm:NAME / torchvision:NAME, got {cfg.arch!r}")
    if cfg.model_kwargs is not None:
        if cfg.arch in ARCHS:
            raise ValueError("--model-kwargs is for timm: and torchvision: archs; the built-in ones take their "
                             "settings as flags")
        parse_model_kwargs(cfg.model_kwargs)
    try:
        parse_pattern(cfg.pattern)
    except ValueError as exc:
        raise ValueError(f"--pattern: {exc}") from None
    if cfg.dataset in ("imagenet", "cifar10", "cifar100") and not cfg.data:
        layout = ("DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG" if cfg.dataset == "imagenet"
                  else "the extracted python batches (data_batch_1..5, test_batch or train, test)")
        raise ValueError(f"{cfg.dataset} needs --data DIR holding {layout}")
    if cfg.data and not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data}: no such directory")
    if cfg.weights in ("timm", "torchvision"):
        if not cfg.arch.startswith(cfg.weights + ":"):
            raise ValueError(f"--weights {cfg.weights} (pretrained weights) needs --arch {cfg.weights}:NAME, got {cfg.arch}")
    elif cfg.weights and not Path(cfg.weights).is_file():
        raise ValueError(f"--weights {cfg.weights}: no such file")
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        raise ValueError(f"--resume {cfg.resume}: no such file (use --resume auto to continue OUTPUT/last.pt)")
    if cfg.eval_only and not (cfg.weights or cfg.resume):  # (pretrained weights of timm/torchvision count)
        raise ValueError("--eval-only needs --weights PATH or --resume")
    if cfg.overwrite and cfg.resume:
        raise ValueError("--overwrite starts over and --resume continues: give one of them")
    if cfg.skip_nonfinite and cfg.amp == "fp16":
        raise ValueError("--skip-nonfinite cannot be combined with --amp fp16, whose grad scaler already skips "
                         "steps with non-finite gradients")
    if cfg.loss_weights and len(cfg.loss_weights) != 2:
        raise ValueError(f"--loss-weights takes two numbers HARD,SOFT, got {len(cfg.loss_weights)}")
    if cfg.loss_weights and (cfg.beta is not None or cfg.soft_weight is not None):
        raise ValueError("--loss-weights replaces --beta and --soft-weight (a --recipe may set them): give one or "
                         "the other")
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --accum-steps {cfg.accum_steps}")


def parse_model_kwargs(text: str | None) -> dict:
    """--model-kwargs "a=0.1,b=True,c=name" -> {"a": 0.1, "b": True, "c": "name"} (Python literals, else strings)."""
    import ast

    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--model-kwargs: expected K=V pairs separated by commas, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def resolve(cfg: TrainConfig, *, cuda: bool, world: int) -> TrainConfig:
    """Fills every unset (None) default from the device, the process count and the data set."""
    cfg.amp = cfg.amp or ("bf16" if cuda else "off")
    cfg.augment = default_augment(cfg.dataset) if cfg.augment == "auto" else cfg.augment
    cfg.channels_last = cuda if cfg.channels_last is None else cfg.channels_last
    if cfg.image_size is None:
        cfg.image_size = 224 if cfg.dataset in ("imagenet", "toy", "synthetic") else 32
    if cfg.lr is None:
        cfg.lr = 0.1 * cfg.batch_size * world / 256
    if cfg.schedule == "step" and not cfg.lr_milestones:
        cfg.lr_milestones = [round(cfg.epochs * f, 3) for f in (1 / 3, 2 / 3, 8 / 9)]
    if cfg.output is None:
        name = f"{cfg.dataset}_{cfg.arch}_{cfg.pattern}".replace(":", "")
        cfg.output = str(Path("runs") / name)
    cfg.output = str(Path(cfg.output).absolute())  # printed and recorded paths hold from any folder
    if not cfg.loss_weights:  # config.json records the loss's weights, not "unset"
        cfg.beta = 0.5 if cfg.beta is None else cfg.beta
        cfg.soft_weight = cfg.temperature**2 if cfg.soft_weight is None else cfg.soft_weight
    if cfg.dataset == "toy" and not cfg.data:
        cfg.data = str(default_toy_dir())
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
    groups = {name: p.add_argument_group(f"{name} ({text})") for name, text in SECTIONS.items()}
    for f, tp in _fields():
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        g = groups[meta["section"]]
        base, is_list = _base_type(tp)
        text = meta["help"] + ("" if meta["lo"] is None and meta["hi"] is None or meta["choices"]
                               else f"; range {_range_text(meta, base)}") + _default_text(f)
        if f.name == "dataset":
            g.add_argument("dataset", nargs="?", choices=meta["choices"], default=None, help=text)
            continue
        names = ([meta["short"]] if meta["short"] else []) + [flag(f.name)]
        kw = dict(dest=f.name, help=text, default=argparse.SUPPRESS)
        if base is bool:
            g.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif is_list:
            g.add_argument(*names, type=_parse_list(base), metavar=meta["metavar"] or "A,B", **kw)
        else:
            g.add_argument(*names, type=_parse_scalar(base) if base is not str else str, choices=meta["choices"],
                           metavar=meta["metavar"], **kw)
    return p


def parse_config(argv=None) -> TrainConfig:
    """Command line -> validated TrainConfig: the dataclass defaults, then the recipe's, then the flags."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("list_recipes"):
        print(describe_recipes())
        parser.exit(0)
    if args.get("dataset") is None:
        args.pop("dataset", None)
    settings = dict(RECIPES[args["recipe"]]) if args.get("recipe") else {}
    settings.update(args)
    try:
        return TrainConfig(**settings)
    except ValueError as exc:
        parser.error(str(exc))


def recipe_command(name: str) -> str:
    """A recipe as the command line that runs it (flags in the field order)."""
    settings = RECIPES[name]
    parts = ["python -m collab_fast.train"]
    if "dataset" in settings:
        parts.append(settings["dataset"])
    for f, _ in _fields():
        if f.name == "dataset" or f.name not in settings:
            continue
        v = settings[f.name]
        if isinstance(v, bool):
            parts.append(flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, list):
            parts.append(f"{flag(f.name)} {','.join(f'{x:g}' for x in v)}")
        else:
            parts.append(f"{flag(f.name)} {v:g}" if isinstance(v, float) else f"{flag(f.name)} {v}")
    return " ".join(parts)


def describe_recipes() -> str:
    """What --list-recipes prints: each recipe's source note and runnable command line."""
    return "\n".join(f"{name}\n  {recipe_command(name)}" for name in RECIPES)
