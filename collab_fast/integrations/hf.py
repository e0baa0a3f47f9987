"""Collaborative heads on Hugging Face `transformers` models: sequence classifiers (CollabForSequenceClassification)
and causal language models (CollabForCausalLM, below: H output layers over the shared body, the fused linear
collaborative loss, the labels shifted as Hugging Face shifts them).

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
RoBERTa, DistilBERT, DeBERTa, ELECTRA, ...; image classifiers through CollabForImageClassification: ViT,
ConvNeXt, ResNet, ...), and models that pool its per-token output at the last non-padding token (GPT-2,
Llama: each head's per-token logits pooled the same way). Which one is checked at construction on a probe
input; any other pooling is refused there in one line.
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
from collab_fast.kernels.fused_linear import fused_linear_collab_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["CollabForCausalLM", "CollabForImageClassification", "CollabForSequenceClassification", "CollabLMOutput",
           "CollabOutput"]

_CLASSIFIER_NAMES = ("classifier", "score")


class _PushToHub:
    """push_to_hub for the wrappers: save_pretrained into a temporary directory, uploaded as one commit."""

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str | None = None, **save_kwargs):
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, **save_kwargs)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message or f"Upload {type(self).__name__}")


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


class CollabForSequenceClassification(_PushToHub, nn.Module):
    # The loss is a mean over the micro-batch (not a sum to be divided by the Trainer's num_items_in_batch):
    # the Trainer then divides it by the gradient-accumulation steps, as it does for stock BERT.
    accepts_loss_kwargs = False
    _auto = "AutoModelForSequenceClassification"  # what from_pretrained builds the model with

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

    def _probe(self) -> dict:
        """Inputs for the construction check: token ids (a padded row where the model has a pad token), or
        images of the config's size."""
        cfg, device = self.model.config, next(self.model.parameters()).device
        if getattr(self.model, "main_input_name", "input_ids") == "pixel_values":
            side = getattr(cfg, "image_size", 64)
            side = side if isinstance(side, int) else side[0]
            return dict(pixel_values=torch.randn(2, getattr(cfg, "num_channels", 3), side, side, device=device))
        vocab = min(getattr(cfg, "vocab_size", 100), 100)
        pad = getattr(cfg, "pad_token_id", None)
        ids = torch.randint(0, vocab, (2 if pad is not None else 1, 6), device=device)
        if pad is not None:
            ids = torch.where(ids == pad, (pad + 1) % vocab, ids)
            ids[0, 4:] = pad  # right padding: a pooling model takes row 0's logits at token 3
        return dict(input_ids=ids)

    def _check_classifier_gives_the_logits(self) -> None:
        was = self.model.training
        self.model.eval()
        probe = self._probe()
        try:
            with torch.no_grad():
                out = self.model(**probe)
                args, kwargs = self._captured
                direct = getattr(self.model, self.classifier_name)(*args, **kwargs)
        except Exception as exc:  # a model this wrapper does not fit fails here, not at the first step
            raise ValueError(f"{type(self.model).__name__} does not run as a classifier on a probe input "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        finally:
            self.model.train(was)
            self._captured = None
        self.pooled = direct.dim() == 3 and out.logits.dim() == 2 and "input_ids" in probe
        if self.pooled:  # a classifier on every token, then the last non-padding token's logits (GPT-2, Llama)
            direct = self._pool(direct, probe["input_ids"])
        if direct.shape != out.logits.shape or not torch.allclose(direct, out.logits):
            raise ValueError(f"{type(self.model).__name__}.{self.classifier_name} does not give the logits, nor "
                             f"per-token logits pooled at the last non-padding token ({tuple(direct.shape)} vs "
                             f"{tuple(out.logits.shape)}); its pooling is not supported")

    def _pool(self, z: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """[B, T, C] -> [B, C] at each row's last non-padding token, as Hugging Face's pooled classifiers take it
        (the last token where no pad token is set or only embeddings are given)."""
        pad = getattr(self.model.config, "pad_token_id", None)
        if pad is None or input_ids is None:
            return z[:, -1]
        positions = torch.arange(input_ids.shape[-1], device=z.device)
        last = (positions * (input_ids.to(z.device) != pad)).argmax(-1)
        return z[torch.arange(z.shape[0], device=z.device), last]

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, return_stats: bool = False, **kwargs) -> CollabOutput:
        # `labels` named here: the Trainer drops dataset columns that forward does not name
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     position_ids=position_ids, inputs_embeds=inputs_embeds)
        return self._heads_and_loss(named, labels, return_stats, kwargs)

    def _heads_and_loss(self, named: dict, labels, return_stats: bool, kwargs: dict) -> CollabOutput:
        kwargs.pop("num_items_in_batch", None)  # see accepts_loss_kwargs
        if labels is None and self.training and torch.is_grad_enabled():
            _refuse_trainer_label_smoothing()
        out = self.model(**{k: v for k, v in named.items() if v is not None}, **kwargs)
        args, kw = self._captured
        self._captured = None
        others = [head(*args, **kw) for head in self.heads]
        if self.pooled:
            others = [self._pool(z, named.get("input_ids")) for z in others]
        z = torch.stack([out.logits] + others)  # [H, N, C]
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
        self.export_head(0).save_pretrained(save_directory, **kwargs)
        _write_extras(Path(save_directory), self.heads.state_dict(),
                      dict(num_heads=self.num_heads, classifier=self.classifier_name, loss=_loss_dict(self.loss_params)))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> CollabForSequenceClassification:
        """A wrapper written by save_pretrained; kwargs go to AutoModelForSequenceClassification.from_pretrained
        (dtype, device_map, ...)."""
        require("transformers", "hf", "collab_fast.integrations.hf")
        import transformers

        settings, tensors = _read_extras(directory, cls.__name__, cls._auto, _hub_keywords(kwargs))
        base = getattr(transformers, cls._auto).from_pretrained(directory, **kwargs)
        model = cls(base, num_heads=settings["num_heads"], loss=settings["loss"])
        if tensors is not None:
            like = next(getattr(base, model.classifier_name).parameters())
            model.heads.load_state_dict({k: v.to(like.device) for k, v in tensors.items()}, strict=True)
        return model


class CollabForImageClassification(CollabForSequenceClassification):
    """CollabForSequenceClassification for `*ForImageClassification` models (ViT, ConvNeXt, ResNet, ...):
    forward takes pixel_values (the Trainer keeps the dataset columns that forward names)."""

    _auto = "AutoModelForImageClassification"

    def forward(self, pixel_values=None, labels=None, return_stats: bool = False, **kwargs) -> CollabOutput:
        return self._heads_and_loss(dict(pixel_values=pixel_values), labels, return_stats, kwargs)


# --------------------------------------------------------------------------------------------------------
# Causal language models: H output layers over the shared body, the fused linear collaborative loss
# --------------------------------------------------------------------------------------------------------


@dataclass
class CollabLMOutput:
    """What CollabForCausalLM's forward returns: the loss (labels given), or head 0's logits (no labels)."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None = None  # [B, T, C], head 0's, only without labels (training never forms them)
    stats: CollabStats | None = None

    def __getitem__(self, i):
        return tuple(v for v in (self.loss, self.logits) if v is not None)[i]

    def keys(self):
        return [k for k in ("loss", "logits") if getattr(self, k) is not None]


class CollabForCausalLM(_PushToHub, nn.Module):
    """H output layers over a causal language model's shared body (ILR sharing below the lm-head: the split is
    the final hidden state), trained with fused_linear_collab_loss, so the [H, B, T, vocab] logits never exist.
    Head 0 is the model's own output layer (tied to the input embeddings where the model ties them); heads
    1..H-1 are new layers, initialised by the model's `_init_weights` (copy_head=True: copies of head 0, for a
    pretrained model whose fresh heads would start from noise). The labels are shifted as Hugging Face's
    causal-LM loss shifts them. Under the Trainer the loss is a sum over the counted tokens divided by its
    num_items_in_batch (the tokens of the whole accumulated batch), as a stock causal LM does: gradient
    accumulation is exact in tokens."""

    loss_type = "ForCausalLM"  # the Trainer then counts num_items_in_batch over the shifted labels

    def __init__(self, model: PreTrainedModel, num_heads: int = 2, loss: CollabLossParams | dict | None = None, *,
                 copy_head: bool = False, softcap: float | None = None, lse_square_scale: float = 0.0,
                 chunk_size: int | None = None):
        super().__init__()
        require("transformers", "hf", "collab_fast.integrations.hf")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if isinstance(loss, dict):
            loss = CollabLossParams(**loss)
        if loss is not None and not isinstance(loss, CollabLossParams):
            raise TypeError(f"loss must be a CollabLossParams or a dict of fused_collab_loss's keywords, got "
                            f"{type(loss).__name__}")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        body = getattr(model, "base_model", None)
        if not isinstance(head, nn.Linear) or body is None or body is model:
            raise ValueError(f"{type(model).__name__} is not a *ForCausalLM model with an output layer "
                             "(get_output_embeddings() a Linear) over a base model: pass e.g. "
                             "AutoModelForCausalLM.from_pretrained(...)")
        self.model, self.num_heads, self.copy_head = model, num_heads, copy_head
        self.loss_params = loss or CollabLossParams()
        self.linear_options = dict(softcap=softcap, lse_square_scale=lse_square_scale, chunk_size=chunk_size)
        fused_linear_collab_loss(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long),
                                 **self.linear_options)  # the options are checked now, not at the first step
        extra = []
        for _ in range(num_heads - 1):
            layer = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                              device=head.weight.device, dtype=head.weight.dtype)
            with torch.no_grad():
                if copy_head:
                    layer.load_state_dict(head.state_dict())
                elif hasattr(model, "_init_weights"):
                    model._init_weights(layer)
            extra.append(layer)
        self.heads = nn.ModuleList(extra)

    @property
    def config(self):
        return self.model.config

    def gradient_checkpointing_enable(self, *args, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(*args, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    def _weights(self):
        head = self.model.get_output_embeddings()
        w = torch.stack([head.weight, *(h.weight for h in self.heads)])  # [H, C, D]
        b = None if head.bias is None else torch.stack([head.bias, *(h.bias for h in self.heads)])
        return w, b

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                num_items_in_batch=None, return_stats: bool = False, **kwargs) -> CollabLMOutput:
        named = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     inputs_embeds=inputs_embeds)
        hidden = self.model.base_model(**{k: v for k, v in named.items() if v is not None}, **kwargs)[0]  # [B, T, D]
        if labels is None:
            if self.training and torch.is_grad_enabled():
                _refuse_trainer_label_smoothing()
            return CollabLMOutput(loss=None, logits=self.model.get_output_embeddings()(hidden))
        weight, bias = self._weights()
        p = self.loss_params
        keywords = dict(temperature=p.temperature, beta=p.beta, soft_weight=p.soft_weight, soft_loss=p.soft_loss,
                        weights=p.weights, detach_consensus=p.detach_consensus, ignore_index=p.ignore_index,
                        label_smoothing=p.label_smoothing, impl=p.impl, **self.linear_options)
        # a sum over the counted tokens divided by the Trainer's count of the whole accumulated batch, or a mean
        reduction = "sum" if num_items_in_batch is not None else p.reduction
        out = fused_linear_collab_loss(hidden, weight, labels.to(hidden.device), bias, shift_labels=True,
                                       reduction=reduction, return_stats=return_stats, **keywords)
        loss, stats = out if return_stats else (out, None)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device).clamp(min=1)
        return CollabLMOutput(loss=loss, stats=stats)

    def export_head(self, k: int = 0) -> PreTrainedModel:
        """The model with head k as its output layer, the wrapped model's class (save_pretrained as usual); a
        model that ties its output layer to the input embeddings is untied for k > 0."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_heads:
            raise ValueError(f"head must be in [0, {self.num_heads}), got {k!r}")
        out = copy.deepcopy(self.model)
        if k > 0:
            head = out.get_output_embeddings()
            tied = head.weight is out.get_input_embeddings().weight
            if tied:
                out.config.tie_word_embeddings = False
                if hasattr(out.config, "get_text_config"):
                    out.config.get_text_config().tie_word_embeddings = False
                head.weight = nn.Parameter(head.weight.detach().clone())
            head.load_state_dict(self.heads[k - 1].state_dict())
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """The model as its own save_pretrained writes it (kwargs go to it), plus heads 1..H-1 and the settings."""
        self.export_head(0).save_pretrained(save_directory, **kwargs)
        _write_extras(Path(save_directory), self.heads.state_dict(),
                      dict(num_heads=self.num_heads, loss=_loss_dict(self.loss_params), copy_head=self.copy_head,
                           **self.linear_options))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> CollabForCausalLM:
        """A wrapper written by save_pretrained; kwargs go to AutoModelForCausalLM.from_pretrained."""
        require("transformers", "hf", "collab_fast.integrations.hf")
        from transformers import AutoModelForCausalLM

        settings, tensors = _read_extras(directory, cls.__name__, "AutoModelForCausalLM", _hub_keywords(kwargs))
        base = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        model = cls(base, num_heads=settings["num_heads"], loss=settings["loss"], copy_head=settings["copy_head"],
                    softcap=settings["softcap"], lse_square_scale=settings["lse_square_scale"],
                    chunk_size=settings["chunk_size"])
        if tensors is not None:
            like = base.get_output_embeddings().weight
            model.heads.load_state_dict({k: v.to(like.device, like.dtype) for k, v in tensors.items()}, strict=True)
        return model


# --------------------------------------------------------------------------------------------------------
# The wrappers' files beside the model's own: the extra heads (checksummed) and the settings
# --------------------------------------------------------------------------------------------------------


def _hub_keywords(kwargs: dict) -> dict:
    # from_pretrained's keywords that also locate the wrapper's own files on the Hub
    return {k: kwargs[k] for k in ("revision", "token", "cache_dir", "force_download", "local_files_only")
            if k in kwargs}


def _loss_dict(params: CollabLossParams) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


def _write_extras(out: Path, heads: dict, settings: dict) -> None:
    from safetensors.torch import save_file

    digest = None
    if heads:
        tmp = out / f".{_HEADS}.{os.getpid()}"
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, out / _HEADS)
    tmp = out / f".{_SETTINGS}.{os.getpid()}"
    tmp.write_text(json.dumps(dict(format=_FORMAT, **settings, heads_sha256=digest), indent=1) + "\n")
    os.replace(tmp, out / _SETTINGS)


def _read_extras(where: str | os.PathLike, wrapper: str, auto: str, hub: dict) -> tuple[dict, dict | None]:
    """The settings and the extra heads (verified) from a local directory, or from a Hub repository (hub:
    revision, token, cache_dir, ... for hf_hub_download)."""
    from safetensors.torch import load

    def fetch(name: str) -> Path:
        if Path(where).is_dir():
            return Path(where) / name
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(where), name, **hub))

    try:
        settings = json.loads(fetch(_SETTINGS).read_text())
        raw = fetch(_HEADS).read_bytes() if settings.get("heads_sha256") else b""
    except Exception as exc:  # OSError, a JSON error, the Hub's (no such repository or file)
        raise ValueError(f"{where} is not a directory written by {wrapper}.save_pretrained ({type(exc).__name__}: "
                         f"{exc}); for a plain model, wrap {auto}.from_pretrained(...) instead") from None
    if settings.get("format") != _FORMAT:
        raise ValueError(f"{where}/{_SETTINGS}: format {settings.get('format')!r}, this collab_fast reads "
                         f"{_FORMAT}; save it again with this version")
    if raw and hashlib.sha256(raw).hexdigest() != settings.get("heads_sha256"):
        raise ValueError(f"{where}/{_HEADS} does not match the checksum in {_SETTINGS} (damaged or replaced); "
                         "save the model again")
    return settings, (load(raw) if raw else None)


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
                    "pass loss=CollabLossParams(label_smoothing=...) to the collaborative wrapper, which smooths "
                    "every head's hard objective")
            return
        frame = frame.f_back
