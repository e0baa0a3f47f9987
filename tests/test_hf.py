"""collab_fast.integrations.hf: heads on a tiny randomly initialised BERT, trained by the stock Trainer, each
exported back into BertForSequenceClassification (configs built in code: no network)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the hf extra (CI stage 5 installs it)")

from collab_fast.integrations.hf import CollabForSequenceClassification  # noqa: E402


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
