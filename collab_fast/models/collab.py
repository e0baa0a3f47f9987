"""Collaborative networks: the paper's head patterns (Fig. 1) for any network, and single-head export.

A pattern is a tree of branching factors over split points. The target network is cut at the split
points into segments (its children run in order, or its traced graph: `split_by`, and
collab_fast.models.graph): the first segment (the trunk) exists once; segment l exists once per
node of tree level l, each copy from a freshly built (independently initialised) target network, so
every head is an exact copy of the target's structure. Where a node splits into k children the
backprop-rescaling op `branch` divides the gradient by k ("backprop"), or sums it ("none", and "loss",
where the trainer instead scales every head's loss by 1/H). Heads are numbered in depth-first order.

    pattern      factors     split points (ImageNet ResNet)      heads
    single       []          -                                   1   (returns the plain network)
    inst2/inst4  [2] / [4]   before everything (nothing shared)  2 / 4
    inst:N       [N]         before everything                   N
    ilr2         [2]         layer2                              2
    hier4        [2, 2]      layer2, layer3                      4
    tree:AxBx..  [A, B, ..]  the architecture's defaults         A*B*..
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from collab_fast.rescale import branch, ensure_ops

__all__ = ["RESCALE_MODES", "SPLIT_BY", "CollabNet", "Segment", "Whole", "forward_units", "parse_pattern", "run_children"]

RESCALE_MODES = ("backprop", "loss", "none")
SPLIT_BY = ("children", "graph")
_NAMED = {"single": [], "ilr2": [2], "hier4": [2, 2]}
BEFORE_ALL = "<input>"  # the split point of independent instances


def parse_pattern(pattern: str) -> tuple[list[int], bool]:
    """Returns (branching factors, independent_instances) for a pattern name."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__}")
    if pattern in _NAMED:
        return list(_NAMED[pattern]), False
    m = re.fullmatch(r"inst:?(\d+)", pattern)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"pattern {pattern!r}: the number of instances must be >= 1")
        return [n], True
    m = re.fullmatch(r"tree:(\d+(?:x\d+)*)", pattern)
    if m:
        factors = [int(f) for f in m.group(1).split("x")]
        if any(f < 1 for f in factors):
            raise ValueError(f"pattern {pattern!r}: every branching factor must be >= 1")
        return factors, False
    raise ValueError(f"unknown pattern {pattern!r}; valid: single, inst2, inst4, inst:N, ilr2, hier4, "
                     "tree:AxB... (e.g. tree:2x2 = hier4, tree:4, tree:2x2x2)")


def _starts_with_linear(module: nn.Module) -> bool:
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return isinstance(module, nn.Linear)


def run_children(modules: nn.ModuleDict, x: Tensor) -> Tensor:
    """Runs named children in order; flattens a feature map before a Linear (or a Sequential classifier
    that starts with one), as ResNets and torchvision's MobileNets do in their forward."""
    for module in modules.values():
        if x.dim() > 2 and _starts_with_linear(module):
            x = x.flatten(1)
        x = module(x)
    return x


class Segment(nn.ModuleDict):
    """One segment of the target network (its units by dotted path, dots as "__"): a Module whose forward
    runs them in order, so that wrappers that hook a module's forward (FSDP2's fully_shard per segment,
    activation checkpointing) can take a segment as their unit. Its state dict is the ModuleDict's."""

    def forward(self, x: Tensor) -> Tensor:
        return run_children(self, x)


class Whole(nn.Module):
    """A whole target network as the segment of an independent instance (split before everything)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _load_into(net: nn.Module, part: nn.Module, names: list[str]) -> None:
    """Copies a children segment's weights into the matching modules of a fresh target network."""
    if isinstance(part, Whole):
        net.load_state_dict(part.net.state_dict())
        return
    for name in names:
        net.get_submodule(name).load_state_dict(part[_key(name)].state_dict())


def _units(paths: list[str], splits: Sequence[str]) -> list[str]:
    """Module paths shortened to the units forward_units would name (the shallowest prefix that holds no split
    point), each once, in order: a traced segment's modules for humans."""
    above = {".".join(s.split(".")[:i]) for s in splits for i in range(1, len(s.split(".")))}
    out: list[str] = []
    for path in paths:
        parts = path.split(".")
        unit = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in above)
        if unit not in out:
            out.append(unit)
    return out


def _is_module(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots; top-level names stay as they are


def forward_units(model: nn.Module, splits: Sequence[str]) -> list[str]:
    """The dotted paths of the modules the model's forward runs in order: its children, with every
    container on a split point's path (an nn.Sequential, which runs its children in order) replaced by
    its own children. E.g. splits ["stages.1"] on a ConvNeXt: stem, stages.0 ... stages.3, norm_pre, head."""
    expand = {".".join(s.split(".")[:i]) for s in splits if s != BEFORE_ALL for i in range(1, len(s.split(".")))}

    def walk(module: nn.Module, prefix: str) -> list[str]:
        out = []
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in expand:
                if not isinstance(child, nn.Sequential):
                    raise ValueError(f"split point inside {path!r}: it is a {type(child).__name__}, whose own forward "
                                     "decides how its children run; split inside an nn.Sequential, or at a child of "
                                     f"{type(model).__name__}")
                out += walk(child, path + ".")
            else:
                out.append(path)
        return out

    return walk(model, "")


def _own_tensors(model: nn.Module, units: list[str]) -> list[str]:
    """Parameters and buffers that belong to the model (or an expanded container) rather than to a unit:
    CollabNet would neither train nor export them."""
    holders = {""} | {".".join(u.split(".")[:i]) for u in units for i in range(1, len(u.split(".")))}
    names = []
    for h in sorted(holders):
        m = model.get_submodule(h) if h else model
        names += [f"{h + '.' if h else ''}{n}" for n in (*m._parameters, *m._buffers)
                  if getattr(m, n, None) is not None]
    return names


class CollabNet(nn.Module):
    """H heads over a tree of shared segments of a target network; forward returns logits [H, N, C].

    Args:
        make_target: builds one target network (a fresh, independently initialised instance per call).
        factors: branching factor of each split level.
        splits: the child name after which each level splits (BEFORE_ALL: before the first child).
        rescale: "backprop" (gradient / children at each split), "loss" or "none" (plain sum).
    """

    def __init__(self, make_target: Callable[[], nn.Module], factors: Sequence[int], splits: Sequence[str],
                 rescale: str = "backprop", split_by: str = "children"):
        # splits: dotted paths (e.g. "stages.1"); split_by "children": into nn.Sequential children run in order,
        # "graph": the target's traced graph cut at those modules' outputs (collab_fast.models.graph)
        super().__init__()
        if rescale not in RESCALE_MODES:
            raise ValueError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
        if split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
        if len(factors) != len(splits) or not factors:
            raise ValueError(f"need one split point per level: factors {list(factors)}, splits {list(splits)}")
        proto = make_target()
        self.factors = list(factors)
        self.splits = list(splits)
        self.rescale = rescale
        self.split_by = split_by
        self.num_heads = math.prod(self.factors)
        self._make_target = make_target
        self._target_name = type(proto).__name__
        if any(f > 1 for f in self.factors):
            ensure_ops()  # build/load the rescaling ops now, not inside a torch.compile trace
        for s in self.splits:
            if s != BEFORE_ALL and not _is_module(proto, s):
                raise ValueError(f"split point {s!r} is not a module of {self._target_name}; its children: "
                                 f"{[n for n, _ in proto.named_children()]}")
        make_segment = self._children_plan(proto) if split_by == "children" else self._graph_plan(proto)
        self.trunk = make_segment(proto, 0)
        self.levels = nn.ModuleList()
        for level in range(len(self.factors)):
            self.levels.append(nn.ModuleList([make_segment(make_target(), level + 1)
                                              for _ in range(math.prod(self.factors[: level + 1]))]))
        thin = self.thin_levels()
        if thin:
            level = thin[0]
            raise ValueError(f"{self._target_name}: split point {self.splits[level]!r} leaves the heads "
                             f"{'no layer' if level == len(self.splits) - 1 else 'no layer at level ' + str(level + 1)}"
                             " of their own beyond the classifier (they would share all but it); split earlier")

    def _children_plan(self, proto: nn.Module) -> Callable[[nn.Module, int], nn.Module]:
        splits = self.splits
        names = forward_units(proto, splits)
        if not names:
            raise ValueError(f"{type(proto).__name__} has no named children to split")
        own = _own_tensors(proto, names)
        if own:
            raise ValueError(f"{type(proto).__name__} has parameters or buffers of its own, outside every child that "
                             f"its forward runs: {', '.join(own[:6])}{' ...' if len(own) > 6 else ''}; a collaborative "
                             "copy would neither train nor export them (move them into a child module, or wrap the "
                             "model so that they are)")
        cuts = []
        for s in splits:
            if s == BEFORE_ALL:
                cuts.append(0)
            elif s not in names:
                raise ValueError(f"split point {s!r} is not a module that {type(proto).__name__}'s forward runs in "
                                 f"order; valid: {names}")
            else:
                cuts.append(names.index(s) + 1)
        if cuts != sorted(set(cuts)) or cuts[-1] >= len(names):
            raise ValueError(f"split points must be distinct children in forward order, before the last child "
                             f"({names[-1]!r}); got {list(splits)}")
        bounds = [0, *cuts, len(names)]
        self.segment_names = [names[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return lambda target, s: Segment({_key(n): target.get_submodule(n) for n in self.segment_names[s]})

    def _graph_plan(self, proto: nn.Module) -> Callable[[nn.Module, int], nn.Module]:
        from collab_fast.models.graph import GraphSegment, split_traced

        if self.splits == [BEFORE_ALL]:  # independent instances: every copy is the whole network
            self.segment_names = [[], [""]]
            return lambda target, s: Segment({}) if s == 0 else Whole(target)
        if BEFORE_ALL in self.splits:
            raise ValueError(f"{BEFORE_ALL} splits only a single level (independent instances)")
        graphs, constants = split_traced(proto, self.splits)
        self.segment_names = [_units([n.target for n in g[True].nodes if n.op == "call_module"], self.splits)
                              for g in graphs]
        segments = [GraphSegment(proto, g, constants) for g in graphs]
        seen: dict[int, int] = {}
        for s, seg in enumerate(segments):
            for key, t in seg.named_parameters():  # a buffer read on both sides (a table of positions) is a constant
                if seen.setdefault(id(t), s) != s:
                    raise ValueError(f"{self._target_name}: {key} is used on both sides of split point "
                                     f"{self.splits[seen[id(t)]]!r} (it would train as two tensors); split at another "
                                     "module")
        first = iter(segments)
        return lambda target, s: next(first) if target is proto else GraphSegment(target, graphs[s], constants)

    def thin_levels(self) -> list[int]:
        """The split levels whose segment holds no weight (a tensor of 2 or more dimensions: a convolution, a
        linear layer, an embedding) of its own, the classifier's not counted: their heads would share all but it."""
        thin = []
        for level, copies in enumerate(self.levels):
            weights = [p for p in copies[0].parameters() if p.dim() >= 2]
            if len(weights) - (level == len(self.levels) - 1) <= 0:
                thin.append(level)
        return thin

    @property
    def loss_factor(self) -> float:
        """Factor on the summed head losses: 1/H for rescale="loss" (the Table 3 ablation), else 1."""
        return 1.0 / self.num_heads if self.rescale == "loss" else 1.0

    def _fan_out(self, x: Tensor, k: int) -> list[Tensor]:
        if k == 1:
            return [x]
        if isinstance(x, (list, tuple)):  # a traced split point that hands on several maps (HRNet's branches)
            parts = [self._fan_out(t, k) for t in x]
            return [type(x)(p[j] for p in parts) for j in range(k)]
        if not x.requires_grad:  # the input of independent instances: nothing to rescale
            return [x] * k
        return branch(x, k, rescale=self.rescale == "backprop")

    def forward(self, x: Tensor) -> Tensor:
        feats = [self.trunk(x)]
        for factor, copies in zip(self.factors, self.levels):  # factor: children per node at this level
            feats = [copies[i * factor + j](child)
                     for i, f in enumerate(feats) for j, child in enumerate(self._fan_out(f, factor))]
        return torch.stack(feats)  # [H, N, C]

    def head_path(self, k: int) -> list[int]:
        """Index of head k's node at every level (depth-first numbering)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_heads:
            raise ValueError(f"head must be an int in [0, {self.num_heads}), got {k!r}")
        return [k // math.prod(self.factors[level + 1:]) for level in range(len(self.factors))]

    def export_head(self, k: int) -> nn.Module:
        """Head k as a plain target network (the class of build(arch, "single")), batch-norm statistics
        included, in this model's train/eval mode."""
        path = self.head_path(k)
        net = self._make_target()
        parts = [self.trunk] + [copies[i] for copies, i in zip(self.levels, path)]
        with torch.no_grad():
            if self.split_by == "graph":  # the parts' state, the target's own metadata (versions some modules read)
                state = net.state_dict()
                for part in parts:
                    for key, value in (part.net if isinstance(part, Whole) else part).state_dict().items():
                        if key not in state:
                            raise RuntimeError(f"a traced segment holds {key!r}, which {type(net).__name__} lacks")
                        state[key] = value
                net.load_state_dict(state)
            else:
                for part, names in zip(parts, self.segment_names):
                    _load_into(net, part, names)
        p = next(iter(self.parameters()), None)
        if p is not None:
            net = net.to(device=p.device)
        net = net.train(self.training)
        # an adapter (collab_fast.models.external.TokenViT) gives back the model it adapts: the original class
        return net.unwrap() if callable(getattr(type(net), "unwrap", None)) else net

    def run_head(self, x: Tensor, k: int) -> Tensor:
        """Head k alone, [N, C]: its path through the tree, no other copy run (no rescaling)."""
        path = self.head_path(k)
        x = self.trunk(x)
        for copies, i in zip(self.levels, path):
            x = copies[i](x)
        return x

    @torch.no_grad()
    def check_forward(self, example: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        """Raises ValueError unless head 0 computes what the target network's own forward computes with the
        same weights, on `example`, in eval mode and in training mode (the same random seed for both, so
        dropout and drop-path match): a model whose forward does more than run its children in order (token
        pooling, a reshape, dropout in code) would otherwise train as a different network."""
        name = self._target_name
        was = self.training
        # training mode moves BN statistics (in place); a cache a module replaces (ConViT's positions) is left
        buffers = [(m, n, b, b.clone()) for m in self.modules() for n, b in m._buffers.items() if b is not None]
        try:
            for mode in ("eval", "training"):
                ref_net = self.export_head(0).train(mode == "training")
                self.train(mode == "training")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    ref = ref_net(example)
                    torch.manual_seed(0)
                    ours = self.run_head(example, 0)
                if not isinstance(ref, Tensor):
                    raise ValueError(f"{name}: its forward returns {type(ref).__name__} in {mode} mode, not one "
                                     "tensor of logits (auxiliary outputs?); build it without them (e.g. "
                                     "aux_logits=False)")
                if ref.shape != ours.shape or not torch.allclose(ours, ref, rtol=rtol, atol=atol):
                    diff = (ours - ref).abs().max().item() if ref.shape == ours.shape else float("nan")
                    raise ValueError(f"{name}: head 0 differs from the model's own forward in {mode} mode (max |diff| "
                                     f"{diff:.3g}, shapes {tuple(ours.shape)} vs {tuple(ref.shape)}){self._why()}")
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise ValueError(f"{name}: running its {'children in order' if self.split_by == 'children' else 'traced graph'}"
                             f" fails ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                             f"{self._why()}") from None
        finally:
            self.train(was)
            for m, n, b, saved in buffers:
                if m._buffers.get(n) is b:
                    b.copy_(saved)

    def _why(self) -> str:
        if self.split_by == "children":
            return (": its forward does more than run its children in order (token pooling, a reshape or dropout "
                    "in code)")
        return ": its traced graph does not reproduce its forward (code that depends on values, not only shapes)"

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, factors={self.factors}, splits={self.splits}, rescale={self.rescale!r}, "
                f"split_by={self.split_by!r}, segments={self.segment_names}")
