"""Collaborative learning inside other frameworks: `lightning` (a LightningModule and an export callback)
and `hf` (heads on a transformers sequence-classification model, trained by the stock Trainer). Each needs
its framework (the `lightning` and `hf` extras) and says so in one line where it is missing."""
