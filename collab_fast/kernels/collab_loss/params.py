"""The loss's settings (`CollabLossParams`, validated once when built) and the statistics it returns."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from collab_fast.cli import check_values, flag, setting, setting_specs

__all__ = ["DEFAULT", "IMPLS", "KERNEL_DTYPES", "MAX_BLOCK_C", "REDUCTIONS", "SOFT_LOSSES", "CollabLossParams",
           "CollabStats", "check_number", "validate_settings"]

REDUCTIONS = ("mean", "sum", "none")
SOFT_LOSSES = ("ce", "kl")
IMPLS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BLOCK_C = 2**16  # a larger column block does not fit Triton's per-tensor limit with several heads


class CollabStats(NamedTuple):
    """Per-head training statistics computed in the same pass as the loss (all on the logits' device)."""

    hard: torch.Tensor  # [H] mean hard (cross-entropy) loss over non-ignored samples
    soft: torch.Tensor  # [H] mean soft (consensus) loss over non-ignored samples; 0 when H == 1
    correct: torch.Tensor  # [H] number of non-ignored samples whose top-1 prediction is the label
    num_valid: torch.Tensor  # [] number of non-ignored samples (float32)


@dataclass(frozen=True, kw_only=True)
class CollabLossParams:
    """The loss's settings, validated once (at construction) and carried as one value from the API
    through the autograd Function and the custom ops to the launcher. See fused_collab_loss."""

    # The fields with `setting` metadata are the trainer's `loss` section too (collab_fast.config): their
    # defaults and ranges here are the only ones; flags, config.json and fused_collab_loss's signature take them.
    temperature: float = setting(2.0, "T of the soft (consensus) objective", lo=0, hi=1e4, lo_open=True)
    beta: float | None = setting(None, "weight of the hard (label) objective; the soft one gets 1 - beta; unset: 0.5 "
                                       "(or unused, with --loss-weights)", lo=0, hi=1)
    soft_weight: float | None = setting(None, "extra factor on the soft objective; unset: T^2 (the paper)", lo=0)
    detach_consensus: bool = setting(True, "the consensus is a constant target (no gradient through it)")
    ignore_index: int = -100
    label_smoothing: float = setting(0.0, "label smoothing of the hard objective (torch's definition)", lo=0, hi=1)
    reduction: str = "mean"
    impl: str = "auto"
    block_c: int | None = None
    soft_loss: str = setting("ce", "soft objective: ce = CE(consensus, head) as in the paper, kl = KL(consensus || "
                                   "head) as several public implementations write it", choices=SOFT_LOSSES)
    weights: tuple[float, float] | None = setting(None, "free factors of the hard and the soft objective, replacing "
                                                        "--beta and --soft-weight (e.g. 1,4 for CE + 4 KL)", lo=0,
                                                  metavar="HARD,SOFT", name="loss_weights")

    def __post_init__(self):
        validate_settings(dict(temperature=self.temperature, beta=self.beta, soft_weight=self.soft_weight,
                               detach_consensus=self.detach_consensus, label_smoothing=self.label_smoothing,
                               soft_loss=self.soft_loss, weights=self.weights))
        put = lambda k, v: object.__setattr__(self, k, v)
        for name in ("temperature", "beta", "soft_weight", "label_smoothing"):  # 3 -> 3.0
            if getattr(self, name) is not None:
                put(name, float(getattr(self, name)))
        if self.weights is not None:
            put("weights", (float(self.weights[0]), float(self.weights[1])))
        else:
            put("beta", 0.5 if self.beta is None else self.beta)
            put("soft_weight", self.temperature**2 if self.soft_weight is None else self.soft_weight)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -(2**63) <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.block_c is not None:
            b = self.block_c
            if isinstance(b, bool) or not isinstance(b, int) or not 16 <= b <= MAX_BLOCK_C or b & (b - 1):
                raise ValueError(f"block_c must be a power of two in [16, {MAX_BLOCK_C}], got {b!r}")

    @property
    def hard_coef(self) -> float:
        """The factor on the hard objective: beta, or weights[0]."""
        return self.weights[0] if self.weights is not None else self.beta

    @property
    def soft_coef(self) -> float:
        """The factor on the soft objective: (1 - beta) * soft_weight, or weights[1]."""
        return self.weights[1] if self.weights is not None else (1.0 - self.beta) * self.soft_weight

    def with_soft_factor(self, factor: float) -> CollabLossParams:
        """These settings with the soft objective's coefficient times `factor` (a soft-weight ramp)."""
        return replace(self, beta=None, soft_weight=None, weights=(self.hard_coef, self.soft_coef * factor))


_SPECS = setting_specs(CollabLossParams)  # at import: the check below also runs inside torch.compile'd code


def validate_settings(values: dict, *, names: str = "field") -> None:
    """The one check of the loss's settings (`values` keyed by field name, unset ones None or absent), from
    a library call (names="field": errors name the argument) or the trainer's flags and config files
    ("flag": they name the flag): each setting's type, choices and range (their `setting` declaration), then the
    rule between them: `weights` replaces `beta` and `soft_weight`."""
    name = (lambda f: f) if names == "field" else (lambda f: flag({"weights": "loss_weights"}.get(f, f)))
    w = values.get("weights")
    if w is not None and (not isinstance(w, (tuple, list)) or len(w) != 2):
        raise ValueError(f"{name('weights')} must be a pair (hard, soft) of numbers >= 0, got {w!r}")
    check_values(CollabLossParams, values, names=names, specs=_SPECS)
    if w is not None and (values.get("beta") is not None or values.get("soft_weight") is not None):
        raise ValueError(f"{name('weights')} replaces {name('beta')} and {name('soft_weight')}: give one or the "
                         "other")


def check_number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    """An argument that is not one of the loss's settings (fused_linear_collab_loss's softcap, ...): a real
    number in [lo, hi] ((lo, hi] with lo_open), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # v - v == 0 is false exactly for inf and nan; math.isfinite breaks a torch.compile(dynamic=True) graph.
    if not v - v == 0.0 or v < lo or v > hi or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]".replace("inf]", "inf)")
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return v


DEFAULT = CollabLossParams()  # the defaults, for the signatures of fused_collab_loss and CollabLoss
