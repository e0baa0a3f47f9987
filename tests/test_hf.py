"""collab_fast.integrations.hf: heads on a tiny randomly initialised BERT, trained by the stock Trainer, each
exported back into BertForSequenceClassification (configs built in code: no network)."""

import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the hf extra (CI stage 5 installs it)")

from collab_fast.integrations.hf import CollabForSequenceClassification  # noqa: E402
from collab_fast.kernels.fused_linear import linear_collab_loss_reference  # noqa: E402


def _bert(num_labels=3):
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 12), generator=g)
    return ids, ids[:, 0] % 3


def test_stock_trainer_trains_and_every_head_exports_into_the_original_class(tmp_path):
    torch.manual_seed(0)
    model = CollabForSequenceClassification(_bert(), num_heads=3)
    ids, labels = _data()
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(len(ids))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=16,
                                          learning_rate=5e-3, report_to=[], use_cpu=True, logging_steps=5,
                                          save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids[:8])
    assert out.heads_logits.shape == (3, 8, 3) and torch.equal(out.logits, out.heads_logits[0])
    assert (out.heads_logits[0] - out.heads_logits[1]).abs().max() > 1e-3  # the heads differ
    for k in range(3):
        head = model.export_head(k)
        head.save_pretrained(tmp_path / f"head{k}")
        again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / f"head{k}").eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids[:8]).logits, out.heads_logits[k])


def test_loss_is_the_collaborative_loss_and_bad_models_are_one_line():
    from collab_fast import fused_collab_loss

    model = CollabForSequenceClassification(_bert(), num_heads=2).eval()
    ids, labels = _data(8)
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, fused_collab_loss(out.heads_logits.float(), labels))
    probs = torch.softmax(torch.randn(8, 3), -1)
    assert torch.isfinite(model(input_ids=ids, labels=probs).loss)
    with pytest.raises(ValueError, match="has no classifier module"):
        CollabForSequenceClassification(transformers.BertModel(_bert().config))
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        CollabForSequenceClassification(_bert(), num_heads=0)


@pytest.mark.parametrize("problem, labels, match", [
    ("multi_label_classification", 3, "configured for multi_label_classification"),
    ("regression", 1, "configured for regression"),
    (None, 1, r"configured for regression \(num_labels = 1\)"),
])
def test_multi_label_and_regression_models_are_refused_not_trained_with_softmax(problem, labels, match):
    bert = _bert(num_labels=labels)
    bert.config.problem_type = problem
    with pytest.raises(ValueError, match=match + ".*single-label classifiers"):
        CollabForSequenceClassification(bert, num_heads=2)


def _still_bert(seed=0):
    # no dropout: two runs that see the same samples take the same steps
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def _train(tmp_path, model, steps=3, **args):
    ids, labels = _data()
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))]
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=16,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True,
                    save_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**defaults, **args}),
                                   train_dataset=rows)
    trainer.train()
    return trainer


@pytest.mark.parametrize("feature", ["gradient_accumulation", "gradient_checkpointing"])
def test_accumulation_and_checkpointing_take_the_same_steps(tmp_path, feature):
    # SGD (not Adam, which would hide a loss scaled by 2): 2 micro-batches of 8 equal one batch of 16
    # (the wrapper's loss was twice too large under accumulation); checkpointing changes no step.
    plain = CollabForSequenceClassification(_still_bert(), num_heads=3)
    _train(tmp_path / "a", plain)
    other = CollabForSequenceClassification(_still_bert(), num_heads=3)
    if feature == "gradient_accumulation":
        _train(tmp_path / "b", other, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    else:
        _train(tmp_path / "b", other, gradient_checkpointing=True)
        assert other.is_gradient_checkpointing
    moved = False
    start = CollabForSequenceClassification(_still_bert(), num_heads=3).state_dict()
    for (name, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(a, start[name])
    assert moved


def test_trainer_label_smoothing_is_refused_and_the_loss_smooths_every_head(tmp_path):
    from collab_fast.kernels.collab_loss import CollabLossParams

    model = CollabForSequenceClassification(_still_bert(), num_heads=2)
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1\) smooths head 0's logits only .* "
                                         r"loss=CollabLossParams\(label_smoothing=...\)"):
        _train(tmp_path / "a", model, label_smoothing_factor=0.1)
    smooth = CollabForSequenceClassification(_still_bert(), num_heads=2, loss={"label_smoothing": 0.1})
    assert smooth.loss_params == CollabLossParams(label_smoothing=0.1)
    head1 = smooth.heads[0].weight.detach().clone()
    _train(tmp_path / "b", smooth, steps=1)
    assert not torch.equal(head1, smooth.heads[0].weight)  # every head trains
    model.eval()
    with torch.no_grad():  # evaluation forwards without labels stay allowed
        model(input_ids=_data(4)[0])


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = CollabForSequenceClassification(_still_bert(), num_heads=3, loss={"temperature": 3.0}).eval()
    model.save_pretrained(tmp_path / "m")
    back = CollabForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert type(back.model) is transformers.BertForSequenceClassification
    assert back.num_heads == 3 and back.loss_params == model.loss_params
    ids = _data(8)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).heads_logits, model(input_ids=ids).heads_logits)
    # head 0's directory is the plain model's too
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="is not a directory written by CollabForSequenceClassification"):
        CollabForSequenceClassification.from_pretrained(tmp_path / "nothing")
    raw = bytearray((tmp_path / "m" / "collab_heads.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "m" / "collab_heads.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the checksum"):
        CollabForSequenceClassification.from_pretrained(tmp_path / "m")


# ------------------------------------------------------------------------------------------ causal LM


def _gpt2(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg)


def _lm_rows(n=32, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, t), generator=g)
    rows = []
    for i in range(n):
        labels = ids[i].clone()
        labels[t - 1 - i % 4:] = -100  # padding of different lengths: micro-batches count different tokens
        rows.append({"input_ids": ids[i], "labels": labels})
    return rows


def test_causal_lm_one_head_is_the_models_own_loss_and_heads_export():
    from collab_fast.integrations.hf import CollabForCausalLM

    model = _gpt2()
    rows = _lm_rows(4)
    ids, labels = torch.stack([r["input_ids"] for r in rows]), torch.stack([r["labels"] for r in rows])
    one = CollabForCausalLM(model, num_heads=1).eval()
    torch.testing.assert_close(one(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss)
    three = CollabForCausalLM(model, num_heads=3, loss={"temperature": 3.0}).eval()
    with torch.no_grad():
        hidden = model.transformer(input_ids=ids).last_hidden_state
        weight = torch.stack([model.lm_head.weight] + [h.weight for h in three.heads])
        want = linear_collab_loss_reference(hidden.double(), weight.double(), labels, shift_labels=True,
                                            temperature=3.0)
        got = three(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(three(input_ids=ids).logits, model(input_ids=ids).logits)  # no labels: head 0's logits
        for k in range(3):
            plain = three.export_head(k)
            assert type(plain) is transformers.GPT2LMHeadModel
            torch.testing.assert_close(plain(input_ids=ids).logits, hidden @ weight[k].T)
    assert model.lm_head.weight is model.transformer.wte.weight  # the wrapped model stays tied


def test_causal_lm_in_the_stock_trainer_accumulates_exactly_and_round_trips(tmp_path):
    from collab_fast.integrations.hf import CollabForCausalLM

    def train(tmp, **args):
        model = CollabForCausalLM(_gpt2(), num_heads=2, lse_square_scale=1e-3)
        defaults = dict(output_dir=str(tmp), max_steps=3, per_device_train_batch_size=8, learning_rate=0.5, optim="sgd",
                        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                        disable_tqdm=True, seed=0, logging_steps=1)
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**{**defaults, **args}),
                                       train_dataset=_lm_rows())
        trainer.train()
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    one, losses = train(tmp_path / "a")
    two, _ = train(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    start = CollabForCausalLM(_gpt2(), num_heads=2).state_dict()
    moved = False
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # the micro-batches count other tokens
        moved |= not torch.equal(a, start[name])
    assert moved and all(math.isfinite(v) for v in losses)
    one.save_pretrained(tmp_path / "m")
    back = CollabForCausalLM.from_pretrained(tmp_path / "m").eval()
    one.eval()
    ids = torch.stack([r["input_ids"] for r in _lm_rows(4)])
    labels = torch.stack([r["labels"] for r in _lm_rows(4)])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, labels=labels).loss, one(input_ids=ids, labels=labels).loss)
    assert back.linear_options["lse_square_scale"] == 1e-3


def test_causal_lm_refuses_what_it_cannot_train():
    from collab_fast.integrations.hf import CollabForCausalLM

    with pytest.raises(ValueError, match="is not a \\*ForCausalLM model"):
        CollabForCausalLM(_gpt2().transformer)
    with pytest.raises(ValueError, match="softcap must be a finite number"):
        CollabForCausalLM(_gpt2(), softcap=-1.0)


# ------------------------------------------------------------------------------ image and pooled classifiers


def _image_model(kind):
    torch.manual_seed(0)
    if kind == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=24, num_labels=3)
        return transformers.ViTForImageClassification(cfg)
    if kind == "convnext":
        cfg = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                          num_labels=3)
        return transformers.ConvNextForImageClassification(cfg)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=3)
    return transformers.ResNetForImageClassification(cfg)


@pytest.mark.parametrize("kind", ["vit", "convnext", "resnet"])
def test_image_classifiers_train_in_the_stock_trainer_and_export(tmp_path, kind):
    from collab_fast.integrations.hf import CollabForImageClassification

    model = CollabForImageClassification(_image_model(kind), num_heads=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=g)
    rows = [{"pixel_values": x[i], "labels": int(x[i, 0].mean() > 0)} for i in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=x[:4])
        assert out.heads_logits.shape == (3, 4, 3)
        for k in range(3):
            head = model.export_head(k).eval()
            assert type(head) is type(model.model)
            torch.testing.assert_close(head(pixel_values=x[:4]).logits, out.heads_logits[k])
    model.save_pretrained(tmp_path / "m")
    back = CollabForImageClassification.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(pixel_values=x[:4]).heads_logits, out.heads_logits)


@pytest.mark.parametrize("pad", [True, False])
def test_pooled_classifiers_pool_every_head_at_the_last_real_token(pad):
    # GPT-2's classifier scores every token, then the model takes the last non-padding token's scores
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=3,
                                  pad_token_id=0 if pad else None)
    model = CollabForSequenceClassification(transformers.GPT2ForSequenceClassification(cfg), num_heads=2).eval()
    assert model.pooled
    ids = torch.randint(1, 50, (3 if pad else 1, 7))
    if pad:
        ids[0, 5:] = 0
        ids[1, 2:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, labels=torch.zeros(ids.shape[0], dtype=torch.long))
        for k in range(2):
            torch.testing.assert_close(model.export_head(k)(input_ids=ids).logits, out.heads_logits[k])
    assert torch.isfinite(out.loss)


def test_push_to_hub_uploads_what_save_pretrained_writes_and_from_pretrained_reads_the_hub(tmp_path, monkeypatch):
    # No network here: the Hub client is replaced by a local folder standing for the repository.
    import huggingface_hub

    repo = tmp_path / "hub"
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["created"] = repo_id

    def upload_folder(self, *, repo_id, folder_path, **kw):
        import shutil

        shutil.copytree(folder_path, repo)
        calls["uploaded"] = sorted(p.name for p in Path(folder_path).iterdir())

    def download(repo_id, filename, **kw):
        assert repo_id == "me/collab-bert" and kw.get("revision") == "main"
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = CollabForSequenceClassification(_bert(), num_heads=3).eval()
    model.push_to_hub("me/collab-bert")
    assert calls["created"] == "me/collab-bert" and {"collab.json", "collab_heads.safetensors", "config.json"} <= \
        set(calls["uploaded"])
    # the model's own files through AutoModel (pointed at the folder), the wrapper's through hf_hub_download
    auto = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda name, **kw: auto(repo))
    back = CollabForSequenceClassification.from_pretrained("me/collab-bert", revision="main").eval()
    ids = _data(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).heads_logits, model(input_ids=ids).heads_logits)
