"""Networks from timm and torchvision (optional extras) as collaborative targets: `build("timm:NAME", ...)`,
`build("torchvision:NAME", ...)`, and the paper's split points found from the network's stage layout.

Split points ("auto"): the network's stages (timm: its `feature_info`, each entry taken at the block it lies
in; torchvision ResNets: layer1..4; any other network: found by a probe image, see `_probed_stages`), then
the stage at 1/2 of them for one split level and at 1/2 and 3/4 for two, as the paper splits a ResNet-50
after conv3_x and conv4_x (sec. 4.2); three levels: 1/4, 1/2, 3/4; a network of few stages: the ones before
the last.

How a copy runs the network (collab_fast.models.collab: `split_by`): its children in order where that
reproduces the model, else its own traced graph cut at the split points (collab_fast.models.graph), which
takes token pooling, class and distillation tokens, blocks in a ModuleList and NHWC stages as they are.
timm's VisionTransformer keeps a declared adapter, `TokenViT` (children embed, blocks, norm and head running
timm's own `_pos_embed` and `forward_head` on the model's own modules and parameters), from before the traced
split existed: its segments are plain modules that checkpoints of this layout name. Not carried by either:
timm's gradient checkpointing (set_grad_checkpointing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from collab_fast.extras import MissingExtra

__all__ = ["TokenViT", "adapt", "external_constructor", "pick_splits", "stage_modules"]


def external_constructor(arch: str, pretrained: bool = False) -> Callable[..., nn.Module]:
    """A constructor(num_classes=..., **model_kwargs) for "timm:NAME" or "torchvision:NAME"."""
    lib, name = arch.split(":", 1)
    if lib == "timm":
        timm = _import("timm", arch)
        if name not in timm.list_models() and not timm.is_model(name):
            raise ValueError(f"--arch {arch}: timm has no model {name!r} (see timm.list_models())")
        return _refusals_in_one_line(arch, functools.partial(timm.create_model, name, pretrained=pretrained))
    tv = _import("torchvision.models", arch)
    if name not in tv.list_models():
        raise ValueError(f"--arch {arch}: torchvision has no model {name!r} (see torchvision.models.list_models())")

    def make(num_classes: int = 1000, **kwargs):
        weights = "DEFAULT" if pretrained else None
        if pretrained and num_classes != 1000:
            raise ValueError(f"--arch {arch} with pretrained weights has 1000 classes; the classifier is "
                             "re-initialised per head anyway: build with num_classes=1000, or without pretrained")
        return tv.get_model(name, weights=weights, num_classes=num_classes, **kwargs)

    return _refusals_in_one_line(arch, make)


# The trainer's flags that reach a library's constructor under its own names.
_FLAG_OF = {"drop_path_rate": "--drop-path", "stochastic_depth_prob": "--drop-path", "in_chans": "grey images"}


def _refusals_in_one_line(arch: str, make: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`make`, with a constructor that refuses its keyword arguments (unknown, misspelt, out of range)
    reported in one line naming them and the flag they came from."""

    @functools.wraps(make)
    def build(num_classes: int = 1000, **kwargs):
        try:
            return make(num_classes=num_classes, **kwargs)
        except (TypeError, ValueError, AssertionError, KeyError) as exc:
            given = ", ".join(f"{k}={v!r}" + (f" (from {_FLAG_OF[k]})" if k in _FLAG_OF else "")
                              for k, v in kwargs.items())
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            flags = "--model-kwargs" + (" and --drop-path" if any(k in _FLAG_OF for k in kwargs) else "")
            raise ValueError(f"--arch {arch} does not build with {given or 'its defaults'} ({type(exc).__name__}: "
                             f"{text}); check {flags}") from None

    return build


def _import(module: str, arch: str):
    # No pip extra: torchvision must be the release built for the installed torch (an unpinned one makes
    # pip replace torch by another build), so the user installs the matching pair.
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or torchvision's RuntimeError beside a torch it was not built for
        raise MissingExtra(f"--arch {arch} needs {module.split('.')[0]} (and torchvision built for torch "
                           f"{torch.__version__.split('+')[0]}), which does not import here "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}): "
                           "pip install timm 'torchvision==<the release for your torch>'") from None


def stage_modules(model: nn.Module) -> list[str]:
    """Dotted paths of the modules that end each stage (the feature map's stride grows after them)."""
    info = getattr(model, "feature_info", None)
    if info is not None:  # timm
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        stages = [_block_of(model, e["module"]) for e in entries if e.get("reduction", 4) >= 4]
        stages = list(dict.fromkeys(m for m in stages if _exists(model, m)))
        if stages:
            return stages  # else its feature_info names modules it lacks (Twins): probe it
    names = [n for n, _ in model.named_children()]
    if info is None and all(f"layer{i}" in names for i in range(1, 5)):  # torchvision ResNet / ResNeXt / Wide ResNet
        return [f"layer{i}" for i in range(1, 5)]
    return _probed_stages(model)


def _block_of(model: nn.Module, path: str) -> str:
    """The block a feature module lies in: the path up to the first element of a Sequential or ModuleList
    ("blocks.2.stack.act3" -> "blocks.2"; Xception takes its features inside a block, before it downsamples)."""
    parts, here = path.split("."), model
    for i, part in enumerate(parts):
        if isinstance(here, (nn.Sequential, nn.ModuleList)):
            return ".".join(parts[: i + 1])
        here = getattr(here, part, None)
        if here is None:
            break
    return path


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _positions(shape: tuple[int, ...]) -> int | None:
    """Spatial positions of a probe's feature map (square input, batch 1): NCHW or NHWC maps (the two equal
    sides), token sequences [1, L, C]; None for anything else (a pooled vector, logits)."""
    if len(shape) == 4 and shape[0] == 1:
        if shape[2] == shape[3]:
            return shape[2] * shape[3]
        if shape[1] == shape[2]:
            return shape[1] * shape[2]
        return None
    if len(shape) == 3 and shape[0] == 1 and shape[1] > 1:
        return shape[1]
    return None


def _probed_stages(model: nn.Module, side: int = 224) -> list[str]:
    """The stages of any network, found by running one probe image with every module hooked: among the
    modules that run each of their children once, the one whose children's feature maps shrink most often
    (a stage ends at the last child before the map shrinks, and at its last map); a network whose maps never
    shrink (a plain transformer) has one stage per block of its longest run of same-shaped blocks."""
    size = getattr(model, "image_size", None)  # torchvision's ViT is built for one size
    side = size if isinstance(size, int) else (getattr(model, "input_size", None) or (3, side, side))[-1]
    calls: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, path=path: calls.setdefault(path, []).append(
        tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        for path, m in model.named_modules() if path]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, side, side))
    except Exception as exc:  # noqa: BLE001 - the reason is given in the one line
        raise ValueError(f"{type(model).__name__}: a {side}x{side} probe to find its stages fails "
                         f"({type(exc).__name__}); pass splits explicitly") from None
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    best: tuple = ()
    for path, container in [("", model), *model.named_modules()]:
        children = [(f"{path}.{n}" if path else n) for n, _ in container.named_children()]
        runs = [(c, _positions(calls[c][0])) for c in children if len(calls.get(c, [])) == 1 and calls[c][0]]
        runs = [(c, n) for c, n in runs if n is not None and 1 < n <= (side // 4) ** 2]  # past the stem
        if not runs:
            continue
        ends = [c for (c, n), (_, m) in zip(runs, runs[1:]) if m < n] + [runs[-1][0]]
        key = (len(ends), -path.count(".") - bool(path), len(runs))
        if key > (best[0] if best else ()):
            best = (key, ends, runs)
    if best and best[0][0] >= 3:
        return best[1]
    blocks: list[str] = []
    for path, container in model.named_modules():
        kids = [f"{path}.{n}" if path else n for n, _ in container.named_children()]
        shapes = [calls[k][0] for k in kids if len(calls.get(k, [])) == 1]
        if len(shapes) == len(kids) >= 4 and len(set(shapes)) == 1 and _positions(shapes[0]) and len(kids) > len(blocks):
            blocks = kids
    if blocks:
        return blocks
    raise ValueError(f"{type(model).__name__}: no stage layout found (no timm feature_info, no layer1..4, no run of "
                     "modules whose feature maps shrink, no run of same-shaped blocks); pass splits explicitly (dotted "
                     "paths of the modules to split after)")


def pick_splits(stages: list[str], levels: int) -> list[str]:
    """The paper's split points among a network's stages (see the module doc)."""
    if len(stages) < levels + 1:
        raise ValueError(f"{levels} split levels do not fit {len(stages)} stages ({stages}); pass splits explicitly")
    fractions = {1: [1 / 2], 2: [1 / 2, 3 / 4], 3: [1 / 4, 1 / 2, 3 / 4]}.get(
        levels, [(i + 1) / (levels + 1) for i in range(levels)])
    picks = [stages[max(0, round(len(stages) * f) - 1)] for f in fractions]
    if len(set(picks)) != len(picks) and len(stages) > levels:  # few stages: the ones before the last
        picks = stages[len(stages) - 1 - levels: len(stages) - 1]
    if len(set(picks)) != len(picks) or picks[-1] == stages[-1] and len(stages) > 1 and levels > 1:
        raise ValueError(f"{levels} split levels do not fit {len(stages)} stages ({stages}); pass splits explicitly")
    return picks


# ----------------------------------------------------------------------------------------------------
# Token models: timm's VisionTransformer as a network that runs its children in order
# ----------------------------------------------------------------------------------------------------


class _Borrowed(nn.Module):
    """Some of a model's modules and tensors (the same objects, not copies) with its plain settings; its methods
    are the model class's, run on this part: a method reads the attributes it needs from the part."""

    def __init__(self, source: nn.Module, modules: tuple[str, ...], tensors: tuple[str, ...]):
        super().__init__()
        object.__setattr__(self, "_cls", type(source))
        for name in modules:
            setattr(self, name, getattr(source, name, None))
        for name in tensors:
            t = getattr(source, name, None)
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            elif isinstance(t, torch.Tensor):
                self.register_buffer(name, t)
            else:
                setattr(self, name, None)
        for name, value in vars(source).items():  # settings: flags, sizes, the pooling mode
            if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str, tuple,
                                                                                       type(None))):
                object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            attr = getattr(self.__dict__.get("_cls"), name, None)
            if callable(attr):
                return attr.__get__(self)
            raise


class _TokenEmbed(_Borrowed):
    def __init__(self, vit: nn.Module):
        super().__init__(vit, ("patch_embed", "pos_drop", "patch_drop", "norm_pre"),
                         ("cls_token", "reg_token", "pos_embed"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))  # timm's: tokens joined, position embedding added, pos_drop
        return self.norm_pre(self.patch_drop(x))


class _TokenHead(_Borrowed):
    def __init__(self, vit: nn.Module):
        super().__init__(vit, ("attn_pool", "fc_norm", "head_drop", "head"), ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._cls.forward_head(self, x)  # timm's: pooling, fc_norm, dropout, classifier


class TokenViT(nn.Module):
    """timm's VisionTransformer (or a subclass) as children run in order: embed, blocks, norm, head. Holds the
    model's own modules and parameters; unwrap() gives back the model itself (the export)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        if not isinstance(getattr(vit, "blocks", None), nn.Sequential):
            raise ValueError(f"{type(vit).__name__}: expected its blocks in an nn.Sequential")
        self.embed = _TokenEmbed(vit)
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.head = _TokenHead(vit)
        object.__setattr__(self, "_vit", vit)
        self.feature_info = getattr(vit, "feature_info", None) or [
            {"module": f"blocks.{i}", "reduction": 16} for i in range(len(vit.blocks))]
        size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
        self.input_size = (3, *size) if size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))))

    def unwrap(self) -> nn.Module:
        """The VisionTransformer itself, in this adapter's train/eval mode (it shares every tensor)."""
        return self._vit.train(self.training)


def adapt(net: nn.Module) -> nn.Module:
    """The network as one that runs its children in order: TokenViT for timm's VisionTransformer family (DeiT's
    distilled models, which average two classifiers in code, are split through their traced graph); any other
    network as it is."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception:  # no timm: nothing of it to adapt
        return net
    if not isinstance(net, VisionTransformer) or getattr(net, "dist_token", None) is not None \
            or hasattr(net, "head_dist"):
        return net
    return TokenViT(net)
