"""Splitting a network's own traced graph (torch.fx) at named module outputs, for networks whose forward does
more than run its children in order (token pooling, a class token joined in code, a distillation head, blocks
in a ModuleList, NHWC permutes between stages).

The target is traced twice, in training and in eval mode (code that reads `self.training` is baked into a
trace), with the split modules kept whole (one call per split point) and the tracing rules of timm and
torchvision where they import (their leaf modules and wrapped functions). Each graph is cut at the split
modules' outputs into segments; segment l runs the nodes between split point l and l+1 on the value the
split point returned. A cut is valid when that value is the only one crossing it: a value of the input
used past a split point (a skip connection around it, a second path) is refused, naming the node. Nodes that
do not depend on the input (a parameter read, a constant) are copied into the segment that uses them; one
parameter or module used on both sides of a cut is refused (it would train as two).

A `GraphSegment` holds the target's own modules and tensors under their qualified names (no copies), so its
state dict is a slice of the target's and a head exports by loading the slices into a fresh target.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence

import torch
from torch import fx, nn

__all__ = ["GraphSegment", "split_traced"]


@functools.lru_cache(maxsize=1)
def _library_rules() -> tuple[tuple[type, ...], tuple, tuple]:
    """(leaf module types, functions to wrap, modules whose functions to wrap) that timm and torchvision
    declare for tracing their models, where they import."""
    leaves: list[type] = []
    functions: list = []
    modules: list = [math]
    try:
        from timm.models import _features_fx as timm_fx

        leaves += list(timm_fx.get_notrace_modules())
        functions += list(timm_fx.get_notrace_functions())
    except Exception:  # no timm (or one without fx rules): its models are not here either
        pass
    try:
        import torchvision.ops

        modules.append(torchvision.ops)
        leaves += [m for m in vars(torchvision.ops).values() if isinstance(m, type) and issubclass(m, nn.Module)]
    except Exception:  # no torchvision that imports beside this torch
        pass
    return tuple(leaves), tuple(functions), tuple(modules)


class _Tracer(fx.Tracer):
    def __init__(self, whole: set[str]):
        leaves, functions, modules = _library_rules()
        super().__init__(autowrap_modules=modules, autowrap_functions=functions)
        self._whole, self._leaf_types = whole, leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self._whole or isinstance(m, self._leaf_types)
                or super().is_leaf_module(m, module_qualified_name))


def _trace(model: nn.Module, whole: Sequence[str], training: bool) -> fx.Graph:
    was = model.training
    model.train(training)
    try:
        # optional arguments keep their defaults (Hiera's mask=None would otherwise trace its masked branch);
        # tensors the forward makes from plain attributes become constants the tracer sets on the model
        # ("_tensor_constant0"), which split_traced takes back
        params = list(inspect.signature(model.forward).parameters.values())[1:]
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        return _Tracer(set(whole)).trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any failure of tracing is the one reason given
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ValueError(f"{type(model).__name__}: torch.fx cannot trace its forward in {'training' if training else 'eval'}"
                         f" mode ({type(exc).__name__}: {text})") from None
    finally:
        model.train(was)


def _depends_on_input(graph: fx.Graph, x: fx.Node) -> set[fx.Node]:
    reached = {x}
    for node in graph.nodes:
        if any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


def _cut(graph: fx.Graph, splits: Sequence[str], name: str, training: bool) -> list[fx.Graph]:
    """The graph cut after each split module's call: len(splits) + 1 graphs, each of one input."""
    nodes = list(graph.nodes)
    result = nodes[-1].args[0]
    if not isinstance(result, fx.Node) or result.op == "call_function" and isinstance(result.target, type):
        what = result.target.__name__ if isinstance(result, fx.Node) else type(result).__name__
        raise ValueError(f"{name}: its forward returns {what} in {'training' if training else 'eval'} mode, not one "
                         "tensor of logits (auxiliary outputs?); build it without them (e.g. aux_logits=False)")
    inputs = [n for n in nodes if n.op == "placeholder"]
    x = inputs[0]
    if any(n.users for n in inputs[1:] if not n.args):  # a second argument without a default
        raise ValueError(f"{name}: its forward takes more than one input")
    pos = {n: i for i, n in enumerate(nodes)}
    cuts = []
    for s in splits:
        calls = [n for n in nodes if n.op == "call_module" and n.target == s]
        if len(calls) != 1:
            raise ValueError(f"{name}: split point {s!r} is " + ("not run by its forward" if not calls else
                             f"run {len(calls)} times by its forward") + "; split after a module it runs once")
        cuts.append(calls[0])
    if [pos[c] for c in cuts] != sorted(pos[c] for c in cuts):
        raise ValueError(f"{name}: split points {list(splits)} are not in the order its forward runs them")
    live = _depends_on_input(graph, x)
    output = nodes[-1]
    seg: dict[fx.Node, int] = {}
    level = 0
    for n in nodes:
        if n in live:
            seg[n] = level
        if level < len(cuts) and n is cuts[level]:
            level += 1
    for n in nodes:
        if n not in live or n is x:
            continue
        for a in n.all_input_nodes:
            if a in live and seg[a] < seg[n] and not (seg[a] == seg[n] - 1 and a is cuts[seg[a]]):
                where = splits[seg[a]]
                raise ValueError(f"{name}: split point {where!r} is not a cut of its traced graph: {a.name!r}, computed "
                                 f"before it, is used after it by {n.name!r} (a skip connection, a second "
                                 "path, or a size taken before it); split at another module")
    graphs = []
    for s in range(len(cuts) + 1):
        members = [n for n in nodes if n in live and seg[n] == s and n is not x and n is not output]
        graphs.append(_piece(nodes, members, live, x if s == 0 else cuts[s - 1], cuts[s] if s < len(cuts) else output))
    return graphs


def _piece(nodes: list[fx.Node], members: list[fx.Node], live: set[fx.Node], entry: fx.Node, exit: fx.Node) -> fx.Graph:
    """A graph of one input (entry's value) that runs `members` and the input-free nodes they read, and returns
    exit's value (exit: a node, or the original output node)."""
    ends = members + ([exit] if exit.op == "output" else [])
    needed: set[fx.Node] = set()
    stack = [a for n in ends for a in n.all_input_nodes if a not in live]
    while stack:
        a = stack.pop()
        if a not in needed:
            needed.add(a)
            stack += [b for b in a.all_input_nodes if b not in live]
    g = fx.Graph()
    env = {entry: g.placeholder("x")}
    keep = needed | set(members)
    for n in nodes:
        if n in keep:
            env[n] = g.node_copy(n, env.__getitem__)
    if exit.op == "output":
        g.node_copy(exit, env.__getitem__)
    else:
        g.output(env[exit])
    g.lint()
    return g


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class GraphSegment(nn.Module):
    """A piece of a traced target network: the target's own modules and tensors (the same objects) under their
    qualified names, running the piece's graph of the current mode (training or eval)."""

    def __init__(self, root: nn.Module, graphs: dict[bool, fx.Graph], constants: dict[str, torch.Tensor]):
        super().__init__()
        for graph in graphs.values():
            for node in graph.nodes:
                if node.op == "get_attr" and node.target in constants:
                    self.register_buffer(node.target, constants[node.target].clone(), persistent=False)
                elif node.op in ("get_attr", "call_module"):
                    self._adopt(root, node.target)
        code = {mode: g.python_code(root_module="self") for mode, g in graphs.items()}
        self._source = {mode: c.src for mode, c in code.items()}
        self._code = {mode: self._compile(c) for mode, c in code.items()}  # functions: deepcopy keeps them as they are
        self.modules_run = [n.target for n in graphs[True].nodes if n.op == "call_module"]

    def _adopt(self, root: nn.Module, path: str) -> None:
        *parents, last = path.split(".")
        here, there = self, root
        for part in parents:
            there = getattr(there, part)
            if not hasattr(here, part):
                here.add_module(part, nn.Module())
            here = getattr(here, part)
        if last in here._modules or last in here._parameters or last in here._buffers:
            return
        value = getattr(there, last)
        if isinstance(value, nn.Module):
            here.add_module(last, value)
        elif isinstance(value, nn.Parameter):
            here.register_parameter(last, value)
        elif isinstance(value, torch.Tensor):  # a buffer, or a constant the tracer stored (moves with .to())
            here.register_buffer(last, value, persistent=last in there._buffers
                                 and last not in there._non_persistent_buffers_set)
        else:
            setattr(here, last, value)

    @staticmethod
    def _compile(code):
        scope = dict(code.globals)
        exec(compile(code.src, "<collab_fast graph segment>", "exec"), scope)  # noqa: S102 - code fx generated
        return scope["forward"]

    def forward(self, x):
        return self._code[self.training](self, x)

    def code(self, training: bool = True) -> str:
        """The Python code this segment runs in that mode (what torch.fx generated)."""
        return self._source[training]


def split_traced(target: nn.Module, splits: Sequence[str]) -> tuple[list[dict[bool, fx.Graph]], dict[str, torch.Tensor]]:
    """The target's traced graphs (training and eval mode) cut after each split module: one {mode: graph} per
    segment (the two modes share one graph where their code is the same), and the tensor constants the
    graphs read by name."""
    name = type(target).__name__
    before = set(vars(target))
    per_mode = {mode: _cut(_trace(target, splits, mode), splits, name, mode) for mode in (True, False)}
    constants = {k: v for k, v in vars(target).items() if k not in before and isinstance(v, torch.Tensor)}
    for k in constants:  # not left on the user's model
        delattr(target, k)
    out = []
    for train_g, eval_g in zip(per_mode[True], per_mode[False]):
        same = train_g.python_code("self").src == eval_g.python_code("self").src
        out.append({True: train_g, False: train_g if same else eval_g})
    return out, constants
