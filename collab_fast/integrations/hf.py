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

Supported: models whose classifier module (`classifier`, or `score`) returns the logits themselves (BERT,
RoBERTa, DistilBERT, DeBERTa, ELECTRA, ...). A model that pools after its classifier (GPT-2 and Llama
take the last token's logits from `score`'s per-token output) is refused at construction with one line.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
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


class CollabForSequenceClassification(nn.Module):
    def __init__(self, model: PreTrainedModel, num_heads: int = 2, loss: CollabLossParams | None = None):
        super().__init__()
        require("transformers", "hf", "collab_fast.integrations.hf")
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
