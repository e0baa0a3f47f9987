"""Collaborative heads on a Hugging Face `transformers` sequence-classification model.

    from collab_fast.integrations.hf import CollabForSequenceClassification
    model = CollabForSequenceClassification(BertForSequenceClassification(config), num_heads=4)
    Trainer(model=model, args=args, train_dataset=ds).train()     # the stock Trainer: forward returns the loss
    model.export_head(0).save_pretrained("out")                   # a BertForSequenceClassification again

The model's body is shared by every head (ILR sharing of everything below the classifier); head 0 is the
model's own classifier and heads 1..H-1 are copies of it, initialised afresh by the model's own
`_init_weights` so that they start apart. One forward runs the body once: a forward pre-hook takes the
classifier's input, and each copy is applied to it. `labels` given, the forward returns the collaborative
loss (fused_collab_loss; class indices, or [N, C] probabilities), so the stock `Trainer` trains it with no
subclass; `logits` is head 0's (what evaluation and the exported model compute) and `heads_logits` all
heads' [H, N, C].

Trainer features: gradient accumulation is exact (`accepts_loss_kwargs = False`: the loss is a mean over
its micro-batch, so the Trainer divides it by the accumulation steps, as for stock BERT; tested against one
step on the whole batch); `gradient_checkpointing=True` is the wrapped model's; `label_smoothing_factor` is
refused in one line at the first training step (the Trainer would take the labels away and smooth head 0's
logits alone, leaving heads 1..H-1 untrained): give `loss=CollabLossParams(label_smoothing=...)` instead,
which smooths every head's hard objective. `save_pretrained(dir)` writes the wrapped model as its own
`save_pretrained` does, plus the extra heads (`collab_heads.safetensors`, checksummed) and the wrapper's
settings (`collab.json`); `CollabForSequenceClassification.from_pretrained(dir)` builds it back through
AutoModelForSequenceClassification.

Supported: models whose classifier module (`classifier`, or `score`) returns the logits themselves (BERT,
RoBERTa, DistilBERT, DeBERTa, ELECTRA, ...). A model that pools after its classifier (GPT-2 and Llama
take the last token's logits from `score`'s per-token output) is refused at construction with one line.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from collab_fast.extras import require
from collab_fast.kernels.collab_loss import CollabLossParams, CollabStats, collab_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["CollabForSequenceClassification", "CollabOutput"]

_CLASSIFIER_NAMES = ("classifier", "score")


@dataclass
class CollabOutput:
    """What the wrapper's forward returns (the fields the Trainer reads: loss, logits)."""

    loss: torch.Tensor | None
    logits: torch.Tensor  # [N, C]: head 0
    heads_logits: torch.Tensor  # [H, N, C]
    stats: CollabStats | None = None

    def __getitem__(self, i):  # the Trainer indexes outputs as a tuple when it is not a dict
        return (self.loss, self.logits)[i] if self.loss is not None else (self.logits,)[i]

    def keys(self):
        return ["loss", "logits"] if self.loss is not None else ["logits"]


_SETTINGS, _HEADS, _FORMAT = "collab.json", "collab_heads.safetensors", 1


class CollabForSequenceClassification(nn.Module):
    # The loss is a mean over the micro-batch (not a sum to be divided by the Trainer's num_items_in_batch):
    # the Trainer then divides it by the gradient-accumulation steps, as it does for stock BERT.
    accepts_loss_kwargs = False

    def __init__(self, model: PreTrainedModel, num_heads: int = 2, loss: CollabLossParams | dict | None = None):
        super().__init__()
        require("transformers", "hf", "collab_fast.integrations.hf")
        if isinstance(loss, dict):  # fused_collab_loss's keywords (as collab.json keeps them)
            loss = CollabLossParams(**loss)
        if loss is not None and not isinstance(loss, CollabLossParams):
            raise TypeError(f"loss must be a CollabLossParams or a dict of fused_collab_loss's keywords, got "
                            f"{type(loss).__name__}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        name = next((n for n in _CLASSIFIER_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
        if name is None:
            raise ValueError(f"{type(model).__name__} has no classifier module (classifier or score): pass a "
                             "*ForSequenceClassification model")
        problem = getattr(model.config, "problem_type", None)
        if problem in ("multi_label_classification", "regression") or getattr(model.config, "num_labels", 2) == 1:
            # the collaborative loss is a softmax cross-entropy over classes, and the consensus a distribution
            what = problem or "regression (num_labels = 1)"
            raise ValueError(f"{type(model).__name__} is configured for {what}; collaborative learning here trains "
                             "single-label classifiers (softmax over classes; problem_type single_label_classification)")
        self.model, self.classifier_name, self.loss_params = model, name, loss or CollabLossParams()
        self.num_heads = num_heads
        self.heads = nn.ModuleList(self._fresh_copy() for _ in range(num_heads - 1))
        self._captured: tuple | None = None
        getattr(model, name).register_forward_pre_hook(self._capture, with_kwargs=True)
        self._check_classifier_gives_the_logits()

    @property
    def config(self):
        return self.model.config  # the Trainer reads the model's config

    # Gradient checkpointing is the wrapped model's (the Trainer calls these for gradient_checkpointing=True).
    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(*args, **kwargs)  # its arguments change between releases

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    def _fresh_copy(self) -> nn.Module:
        head = copy.deepcopy(getattr(self.model, self.classifier_name))
        init = getattr(self.model, "_init_weights", None)
        for m in head.modules():
            if init is not None:
                init(m)
            elif hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return head

    def _capture(self, module, args, kwargs):
        self._captured = (args, kwargs)

    def _check_classifier_gives_the_logits(self) -> None:
        was = self.model.training
        self.model.eval()
        try:
            ids = torch.randint(0, min(getattr(self.model.config, "vocab_size", 100), 100), (2, 5),
                                device=next(self.model.parameters()).device)
            with torch.no_grad():
                out = self.model(input_ids=ids)
                args, kwargs = self._captured
                direct = getattr(self.model, self.classifier_name)(*args, **kwargs)
        finally:
            self.model.train(was)
            self._captured = None
        if direct.shape != out.logits.shape or not torch.allclose(direct, out.logits):
            raise ValueError(f"{type(self.model).__name__}.{self.classifier_name} does not return the logits (the model "
                             f"pools after it: {tuple(direct.shape)} vs {tuple(out.logits.shape)}); only models whose "
                             "classifier gives the logits are supported")

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, return_stats: bool = False, **kwargs) -> CollabOutput:
        # `labels` named here: the Trainer drops dataset columns that forward does not name
        kwargs.pop("num_items_in_batch", None)  # see accepts_loss_kwargs
        if labels is None and self.training and torch.is_grad_enabled():
            _refuse_trainer_label_smoothing()
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, inputs_embeds=inputs_embeds)
        out = self.model(**{k: v for k, v in named.items() if v is not None}, **kwargs)
        args, kw = self._captured
        self._captured = None
        z = torch.stack([out.logits] + [head(*args, **kw) for head in self.heads])  # [H, N, C]
        loss = stats = None
        if labels is not None:
            result = collab_loss(z.float(), labels, self.loss_params, return_stats=return_stats)
            loss, stats = result if return_stats else (result, None)
        return CollabOutput(loss=loss, logits=z[0], heads_logits=z, stats=stats)

    def export_head(self, k: int = 0) -> PreTrainedModel:
        """Head k as the wrapped model's own class (save_pretrained / from_pretrained as usual)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_heads:
            raise ValueError(f"head must be in [0, {self.num_heads}), got {k!r}")
        hook_free = copy.deepcopy(self.model)
        classifier = getattr(hook_free, self.classifier_name)
        classifier._forward_pre_hooks.clear()
        if k > 0:
            classifier.load_state_dict(self.heads[k - 1].state_dict())
        return hook_free

    # ------------------------------------------------------------------ save_pretrained / from_pretrained

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The wrapped model as its own save_pretrained writes it (kwargs go to it), plus heads 1..H-1 and the
        wrapper's settings; from_pretrained reads the directory back."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        self.export_head(0).save_pretrained(out, **kwargs)
        heads = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        tmp = out / f".{_HEADS}.{os.getpid()}"
        save_file(heads, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, out / _HEADS)
        settings = dict(format=_FORMAT, num_heads=self.num_heads, classifier=self.classifier_name,
                        loss={k: list(v) if isinstance(v, tuple) else v
                              for k, v in dataclasses.asdict(self.loss_params).items()},
                        heads_sha256=digest)
        tmp = out / f".{_SETTINGS}.{os.getpid()}"
        tmp.write_text(json.dumps(settings, indent=1) + "\n")
        os.replace(tmp, out / _SETTINGS)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> CollabForSequenceClassification:
        """A wrapper written by save_pretrained; kwargs go to AutoModelForSequenceClassification.from_pretrained
        (dtype, device_map, ...)."""
        require("transformers", "hf", "collab_fast.integrations.hf")
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification

        where = Path(directory)
        try:
            settings = json.loads((where / _SETTINGS).read_text())
            raw = (where / _HEADS).read_bytes() if settings.get("num_heads", 1) > 1 else b""
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where} is not a directory written by CollabForSequenceClassification.save_pretrained "
                             f"({type(exc).__name__}: {exc}); for a plain model, wrap "
                             "AutoModelForSequenceClassification.from_pretrained(...) instead") from None
        if settings.get("format") != _FORMAT:
            raise ValueError(f"{where / _SETTINGS}: format {settings.get('format')!r}, this collab_fast reads "
                             f"{_FORMAT}; save it again with this version")
        if raw and hashlib.sha256(raw).hexdigest() != settings.get("heads_sha256"):
            raise ValueError(f"{where / _HEADS} does not match the checksum in {_SETTINGS} (damaged or replaced); "
                             "save the model again")
        base = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
        model = cls(base, num_heads=settings["num_heads"], loss=settings["loss"])
        if raw:
            like = getattr(base, model.classifier_name).weight
            heads = {k: v.to(like.device) for k, v in load_file(str(where / _HEADS)).items()}
            model.heads.load_state_dict(heads, strict=True)
        return model


def _refuse_trainer_label_smoothing() -> None:
    """A training forward without labels: under a Trainer with label_smoothing_factor the Trainer took them,
    to smooth head 0's logits alone. Refused, naming what does smooth every head (a few frames looked at, only
    on this path)."""
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            if getattr(owner, "label_smoother", None) is not None and getattr(owner, "compute_loss_func", None) is None:
                raise ValueError(
                    f"TrainingArguments(label_smoothing_factor={owner.args.label_smoothing_factor}) smooths head 0's "
                    "logits only (the Trainer takes the labels from the model): set label_smoothing_factor=0 and "
                    "pass loss=CollabLossParams(label_smoothing=...) to CollabForSequenceClassification, which "
                    "smooths every head's hard objective")
            return
        frame = frame.f_back
