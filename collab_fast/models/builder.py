"""Building networks: `build(arch, pattern, ...)` and `make_collaborative(factory, pattern, ...)` (any network
made collaborative), and the trainer's `model` section, `ModelConfig`, which builds the training model: the
network with its initial weights and synchronised batch norm, then wrapped (DDP, then torch.compile)."""

from __future__ import annotations

import ast
import contextlib
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import nn

from collab_fast.checkpoint import CheckpointError, is_checkpoint, load_file, verify_checkpoint
from collab_fast.cli import check_fields, setting
from collab_fast.distributed import Dist
from collab_fast.models.collab import BEFORE_ALL, RESCALE_MODES, SPLIT_BY, CollabNet, parse_pattern
from collab_fast.models.heads import single_head
from collab_fast.models.registry import (
    ARCHS,
    EXTERNAL_PREFIXES,
    arch_entry,
    default_splits,
    input_channels,
    is_builtin_resnet,
)

__all__ = ["ModelConfig", "build", "build_model", "check_input_size", "initial_weights", "load_weights",
           "make_collaborative", "parse_model_kwargs", "reinit_classifier", "sync_batchnorm"]


def reinit_classifier(model: nn.Module) -> nn.Module:
    """Re-initialises the model's classifier (timm's reset_classifier, else its last Linear): copies built
    from one set of pretrained weights start from the same features but different decision layers, so
    their outputs, and what they teach each other, differ from the first step."""
    if hasattr(model, "reset_classifier") and hasattr(model, "num_classes"):
        model.reset_classifier(model.num_classes)
        return model
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to re-initialise per head")
    last[-1].reset_parameters()
    return model


# The return type follows the pattern (for type checkers): "single" is the target network itself (answering
# num_heads, loss_factor and export_head: models.heads.single_head), every other pattern a CollabNet
# ([H, N, C] logits; as_heads gives a single network's the same shape).
@overload
def make_collaborative(  # type: ignore[overload-overlap]
                       make_target: Callable[[], nn.Module], pattern: Literal["single"],
                       splits: Sequence[str] | str | None = ..., rescale: str = ...,
                       example_input: torch.Tensor | None = ..., split_by: str = ...) -> nn.Module: ...
@overload
def make_collaborative(make_target: Callable[[], nn.Module], pattern: str, splits: Sequence[str] | str | None = ...,
                       rescale: str = ..., example_input: torch.Tensor | None = ..., split_by: str = ...) -> CollabNet: ...
def make_collaborative(make_target: Callable[[], nn.Module], pattern: str, splits: Sequence[str] | str | None = None,
                       rescale: str = "backprop", example_input: torch.Tensor | None = None,
                       split_by: str = "auto") -> nn.Module:
    """Collaborative version of any network.

    make_target builds a fresh target network per call (so copies are independently initialised); splits
    names the module after which each level splits, as a dotted path ("layer2", "stages.1", "blocks.5"), or
    "auto" (the paper's points among the network's stages; see collab_fast.models.external); not needed for
    single and inst patterns. split_by: "children" runs the target's children in order (split points inside
    nn.Sequential containers); "graph" cuts the target's own traced graph (torch.fx) at the split modules'
    outputs, for a forward that does more (see collab_fast.models.graph); "auto" takes the children where
    they build and, given example_input, reproduce the model, else the graph (model.split_by says which).
    example_input: checks that head 0 computes what the network's own forward does (eval and training
    mode), refusing a split that does not.
    """
    factors, instances = parse_pattern(pattern)
    if not factors:
        return single_head(make_target())
    if split_by not in ("auto", *SPLIT_BY):
        raise ValueError(f"split_by must be 'auto' or one of {SPLIT_BY}, got {split_by!r}")
    if instances:
        splits = [BEFORE_ALL]
    else:
        if splits == "auto":
            from collab_fast.models.external import pick_splits, stage_modules

            splits = pick_splits(stage_modules(make_target()), len(factors))
        if splits is None or isinstance(splits, str) or len(splits) != len(factors):
            raise ValueError(f"pattern {pattern!r} has {len(factors)} split level(s): pass that many split points "
                             f"(dotted module paths) or splits='auto', got {splits!r}")
        splits = list(splits)
    ways = ["children", "graph"] if split_by == "auto" else [split_by]
    reasons = []
    for way in ways:
        try:
            model = CollabNet(make_target, factors, splits, rescale=rescale, split_by=way)
            if example_input is not None:
                model.check_forward(example_input)
            return model
        except ValueError as exc:
            reasons.append(str(exc))
    if len(reasons) == 1 or reasons[0] == reasons[1]:
        raise ValueError(reasons[-1])
    raise ValueError(f"{reasons[1]}; and running its children in order: {reasons[0]}")


@overload
def build(  # type: ignore[overload-overlap]
          arch: str, pattern: Literal["single"] = ..., num_classes: int | None = ..., rescale: str = ...,
          splits: Sequence[str] | str | None = ..., pretrained: bool = ...,
          weights: dict[str, torch.Tensor] | None = ..., **arch_kwargs) -> nn.Module: ...
@overload
def build(arch: str, pattern: str, num_classes: int | None = ..., rescale: str = ...,
          splits: Sequence[str] | str | None = ..., pretrained: bool = ...,
          weights: dict[str, torch.Tensor] | None = ..., **arch_kwargs) -> CollabNet: ...
def build(arch: str, pattern: str = "single", num_classes: int | None = None, rescale: str = "backprop",
          splits: Sequence[str] | str | None = None, pretrained: bool = False,
          weights: dict[str, torch.Tensor] | None = None, **arch_kwargs) -> nn.Module:
    """The target network (pattern "single") or its collaborative version; see collab_fast.models.collab.

    arch: a built-in name (ARCHS), or "timm:NAME" / "torchvision:NAME" (the timm / torchvision extras),
    whose split points default to "auto" and whose head 0 is checked against the model's own forward.
    pretrained: the library's pretrained weights in every copy, the classifier re-initialised per head.
    weights: a state dict of the target network (an exported head, a converted checkpoint) loaded into every
    copy, likewise with the classifier re-initialised per head (pattern single: loaded as it is).
    """
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    external = arch.startswith(EXTERNAL_PREFIXES)
    if external:
        from collab_fast.models.external import external_constructor

        ctor, default_classes = external_constructor(arch, pretrained), 1000
    else:
        if pretrained:
            raise ValueError(f"pretrained weights exist for timm:NAME and torchvision:NAME archs, not {arch!r}")
        ctor, _, default_classes = arch_entry(arch)
    num_classes = default_classes if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    make_target = functools.partial(ctor, num_classes=num_classes, **arch_kwargs)
    factors, instances = parse_pattern(pattern)
    if weights is not None:
        plain_ctor = make_target

        def make_target():
            net = plain_ctor()
            try:
                net.load_state_dict(weights, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"the weights do not fit {type(net).__name__}: {str(exc).splitlines()[0]}") from None
            return net
    if (pretrained or weights is not None) and factors:
        plain = make_target
        make_target = lambda: reinit_classifier(plain())  # noqa: E731
    if external and factors:  # a token model runs its children in order through its adapter
        from collab_fast.models.external import adapt

        unadapted = make_target
        make_target = lambda: adapt(unadapted())  # noqa: E731
    if factors and not instances and splits is None:
        splits = "auto" if external else default_splits(arch, len(factors))
    example = None
    if external and factors:
        # One probe instance answers the input size and the split points, then serves as the collaborative
        # network's first copy: a large model is not built extra times.
        probe = make_target()
        side = getattr(probe, "image_size", None)  # torchvision's ViT: built for one size
        size = getattr(probe, "input_size", None) or (getattr(probe, "pretrained_cfg", None) or {}).get(
            "input_size", (3, side, side) if isinstance(side, int) else (3, 224, 224))
        size = (arch_kwargs.get("in_chans", size[0]), *size[1:])  # timm's pretrained_cfg keeps the pretrained 3
        example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        if splits == "auto" and not instances:
            from collab_fast.models.external import pick_splits, stage_modules

            splits = pick_splits(stage_modules(probe), len(factors))
        unused, fresh = [probe], make_target
        make_target = lambda: unused.pop() if unused else fresh()  # noqa: E731
    model = make_collaborative(make_target, pattern, splits, rescale, example)
    # How to build this network again (Lightning's load_from_checkpoint, Hugging Face's from_pretrained): the
    # weights come from the checkpoint, so neither pretrained nor weights is repeated.
    # Only plain values, which load under weights_only=True; a constructor given objects records none.
    spec = dict(arch=arch, pattern=pattern, num_classes=num_classes, rescale=rescale,
                splits=list(model.splits) if isinstance(model, CollabNet) else None, **arch_kwargs)
    model.build_spec = spec if _plain(spec) else None
    return model


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))



# ----------------------------------------------------------------------------------------------------
# The trainer's `model` section
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The network, its head pattern and its initial weights: the trainer's `model` section."""

    arch: str = setting("resnet50", f"network: {', '.join(ARCHS)}, or timm:NAME / torchvision:NAME (any model of those "
                                    "libraries, where they import; split points found from its stages)")
    model_kwargs: str | None = setting(None, "keyword arguments of a timm: or torchvision: model's constructor, e.g. "
                                             "drop_path_rate=0.1,drop_rate=0.2", metavar="K=V,...")
    pattern: str = setting("hier4", "head pattern: single, inst2, inst4, inst:N, ilr2, hier4, tree:AxB...")
    rescale: str = setting("backprop", "gradient rescaling at split points (the paper's Table 3 ablation)",
                           choices=RESCALE_MODES)
    zero_init_residual: bool = setting(True, "ResNets: each block's last BN scale starts at 0 (Goyal et al. 2017)")
    drop_path: float = setting(0.0, "stochastic depth (Huang et al. 2016): the largest drop rate of a residual branch, "
                                    "rising linearly over the blocks; built-in ResNets, timm (drop_path_rate) and "
                                    "torchvision models with stochastic_depth_prob", lo=0, hi=1, hi_open=True)
    sync_bn: bool = setting(False, "synchronised batch norm across the processes of a multi-GPU run (statistics of the "
                                   "global batch)")
    channels_last: bool | None = setting(None, "channels-last memory format; unset: on with CUDA")
    compile: bool = setting(False, "torch.compile the model")
    compile_step: bool = setting(False, "torch.compile the whole optimizer step: forward, loss, backward (compiled "
                                        "autograd) and the update, with the learning rate and the soft ramp's factor "
                                        "read from device tensors (no recompilation between steps)")
    cuda_graphs: bool = setting(False, "capture the whole optimizer step (forward, loss, backward, update, EMA, meter) "
                                       "in a CUDA graph after a few eager warm-up steps and replay it at every step "
                                       "after: one launch per step; every training batch must have the same shape "
                                       "(on CPU: a slower rehearsal that replays the recorded ops)")
    weights: str | None = setting(None, "initial weights: an exported head (.pth: into every copy of a collaborative "
                                        "pattern, the classifier re-initialised per head), a training checkpoint, or "
                                        "timm / torchvision (that library's pretrained weights, for its archs)",
                                  metavar="PATH|timm|torchvision")

    def __post_init__(self):
        check_fields(self)
        if self.arch not in ARCHS and not self.arch.startswith(EXTERNAL_PREFIXES):
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, or timm:NAME / torchvision:NAME, got "
                             f"{self.arch!r}")
        if self.model_kwargs is not None:
            if self.arch in ARCHS:
                raise ValueError("--model-kwargs is for timm: and torchvision: archs; the built-in ones take their "
                                 "settings as flags")
            given = parse_model_kwargs(self.model_kwargs)
            taken = sorted(set(given) & set(_BUILDER_KWARGS))
            if taken:
                raise ValueError(f"--model-kwargs {taken[0]}: {_BUILDER_KWARGS[taken[0]]}; remove it from "
                                 "--model-kwargs")
            depth = sorted(set(given) & {"drop_path_rate", "stochastic_depth_prob"})
            if depth and self.drop_path:
                raise ValueError(f"--model-kwargs {depth[0]} and --drop-path set the same thing: give one")
        if self.drop_path and self.arch in ARCHS and not is_builtin_resnet(self.arch):
            raise ValueError(f"--drop-path: {self.arch} has no residual blocks to drop; it applies to the ResNets and "
                             "to timm: / torchvision: models that take it")
        if self.compile and self.compile_step:
            raise ValueError("--compile and --compile-step: give one (--compile-step compiles the model inside the "
                             "step)")
        try:
            parse_pattern(self.pattern)
        except ValueError as exc:
            raise ValueError(f"--pattern: {exc}") from None
        if self.pretrained:
            if not self.arch.startswith(self.weights + ":"):
                raise ValueError(f"--weights {self.weights} (pretrained weights) needs --arch {self.weights}:NAME, "
                                 f"got {self.arch}")
        elif self.weights and not Path(self.weights).is_file():
            raise ValueError(f"--weights {self.weights}: no such file")

    def check_capture(self, *, cuda: bool, world: int) -> None:
        """--cuda-graphs' limits where there is no CUDA: the step is then rehearsed on an op tape (graphs.OpTape),
        which records ATen ops in one process; compiled code and another process's collectives run outside them."""
        if not self.cuda_graphs or cuda:
            return
        if self.compile or self.compile_step:
            flag = "--compile" if self.compile else "--compile-step"
            raise ValueError(f"--cuda-graphs with {flag} needs CUDA: without it the capture is rehearsed by recording "
                             "ATen ops, and compiled code runs outside them; drop one of the two on this device")
        if world > 1:
            raise ValueError("--cuda-graphs under torchrun needs CUDA (NCCL): without it the capture is rehearsed in one "
                             "process only")

    @property
    def pretrained(self) -> bool:
        """--weights names a library's pretrained weights, not a file."""
        return self.weights in ("timm", "torchvision")

    def build(self, num_classes: int, *, device: torch.device, proc: Dist, image_size: int,
              in_chans: int) -> tuple[nn.Module, nn.Module]:
        """The training model, as (net, model). net: the bare network on `device` (its state dicts, export,
        num_heads) with its initial weights (--weights) and synchronised batch norm (--sync-bn); model: what
        runs the forward pass, net wrapped in DistributedDataParallel (several processes), then torch.compile
        (--compile). The wrapping order lives here only. A resumed run loads its checkpoint into net after."""
        copies, whole = initial_weights(self)
        net = build_model(self, num_classes, device, copies, in_chans=in_chans)
        check_input_size(net, self.arch, image_size, in_chans)
        if whole is not None:
            load_weights(net, self.weights, whole)
        if self.sync_bn:
            net = sync_batchnorm(net, proc, device)
        model = net
        if proc.world > 1:
            ids = [proc.local_rank] if device.type == "cuda" else None
            # --cuda-graphs: DDP built on a side stream (PyTorch's recipe for capturing DDP's backward)
            side = torch.cuda.stream(torch.cuda.Stream(device)) if self.cuda_graphs and ids else contextlib.nullcontext()
            with side:
                model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        if self.compile:
            model = torch.compile(model)
        return net, model


# Keywords that build_model gives every constructor itself: --model-kwargs may not set them.
_BUILDER_KWARGS = {
    "num_classes": "set by the trainer from the data set's classes",
    "pretrained": "pretrained weights are --weights timm / --weights torchvision",
    "weights": "pretrained weights are --weights timm / --weights torchvision; a file is --weights PATH",
    "rescale": "backprop rescaling is --rescale",
    "splits": "split points follow --pattern",
    "in_chans": "the input channels follow the data set (grey or colour)",
}


def parse_model_kwargs(text: str | None) -> dict:
    """--model-kwargs "a=0.1,b=True,c=name" -> {"a": 0.1, "b": True, "c": "name"} (Python literals, else strings)."""
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



def check_input_size(net: nn.Module, arch: str, image_size: int, in_chans: int) -> None:
    """A timm: / torchvision: network built for fixed input sizes (a ViT's patch grid, Inception's minimum)
    is run once on two images of the training size, so a size it does not take is one line before training,
    not a traceback at the first step. The built-in networks take any size."""
    if arch in ARCHS:
        return
    p = next(net.parameters(), None)
    if p is None:
        return
    x = torch.zeros(2, in_chans, image_size, image_size, device=p.device, dtype=p.dtype)
    was = net.training
    try:
        with torch.no_grad():
            net.eval()(x)
    except torch.OutOfMemoryError:
        raise
    except (AssertionError, RuntimeError, ValueError) as exc:
        # the size it was built for: timm's input_size / pretrained_cfg, or a patch embedding's img_size
        built = next((size for m in net.modules() for size in (getattr(m, "input_size", None),
                      (getattr(m, "pretrained_cfg", None) or {}).get("input_size"), getattr(m, "img_size", None))
                      if isinstance(size, (tuple, list)) and size), None)
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        hint = f"--image-size {built[-1]} (its size)" if built else "the --image-size it was built for"
        timm_hint = f", or --model-kwargs img_size={image_size} (timm ViTs)" if arch.startswith("timm:") else ""
        raise ValueError(f"--arch {arch} does not take {image_size}x{image_size} images ({type(exc).__name__}: "
                         f"{text}); give {hint}{timm_hint}") from None
    finally:
        net.train(was)


def build_model(model: ModelConfig, num_classes: int | None = None, device: torch.device | str = "cpu",
                weights: dict[str, torch.Tensor] | None = None, in_chans: int = 3) -> nn.Module:
    """The network `model` describes, on `device` (channels-last when asked); num_classes None: the
    architecture's default. `weights`: a plain network's
    state dict (an exported head) for every copy, the classifier re-initialised per head; --weights of a
    file is read by the caller (the trainer), a library's pretrained weights here. in_chans: the input
    images' channels (1 for grey sets; see input_channels)."""
    if input_channels(model.arch, in_chans) != in_chans:
        raise ValueError(f"{model.arch} takes 3-channel images, not {in_chans} (give grey images as 3 equal channels)")
    arch_kw: dict[str, Any] = {"zero_init_residual": model.zero_init_residual} if is_builtin_resnet(model.arch) else {}
    if in_chans != 3:
        arch_kw["in_chans"] = in_chans
    if model.drop_path:  # each library's name for it
        key = ("drop_path" if model.arch in ARCHS else "drop_path_rate" if model.arch.startswith("timm:")
               else "stochastic_depth_prob")
        arch_kw[key] = model.drop_path
    arch_kw.update(parse_model_kwargs(model.model_kwargs))
    net = build(model.arch, model.pattern, num_classes=num_classes, rescale=model.rescale,
                pretrained=model.pretrained, weights=weights, **arch_kw).to(device)
    return net.to(memory_format=torch.channels_last) if model.channels_last else net


def initial_weights(model: ModelConfig) -> tuple[dict | None, object]:
    """--weights PATH, read once: (the state dict for every copy, what load_weights loads as it is). A plain
    network's (an exported head) for a collaborative pattern goes into every copy through build (the
    classifier re-initialised per head); a training checkpoint, or pattern single, is loaded whole after."""
    if not model.weights or model.pretrained:
        return None, None
    obj = load_file(model.weights)
    if model.pattern == "single" or is_checkpoint(obj):
        return None, obj  # the model as it is (a training checkpoint of this very model: load_weights)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"--weights {model.weights}: expected a state dict of tensors, found a "
                              f"{type(obj).__name__}")
    return obj, None


def load_weights(net: nn.Module, path: str, obj=None) -> None:
    """--weights: an exported head (plain state dict) or a training checkpoint of the same model. `obj`: the
    file's content when the caller has read it already (it is read once)."""
    obj = load_file(path) if obj is None else obj
    if is_checkpoint(obj):
        obj = verify_checkpoint(obj, path)["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"--weights {path}: expected a state dict of tensors, found a {type(obj).__name__}")
    try:
        net.load_state_dict(obj, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"--weights {path} does not fit {type(net).__name__}: "
                              f"{str(exc).splitlines()[0]} (an exported head needs --pattern single)") from None


def sync_batchnorm(net: nn.Module, proc: Dist, device: torch.device) -> nn.Module:
    """--sync-bn: batch-norm statistics over the global batch (torch's SyncBatchNorm, GPUs only). The state
    dict keeps its names, so checkpoints and exported heads are those of plain batch norm."""
    if proc.world == 1:
        if proc.main:
            print("collab_fast: --sync-bn has nothing to synchronise in a single process; plain batch norm",
                  file=sys.stderr)
        return net
    if device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); drop it")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
