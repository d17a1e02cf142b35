"""Evaluation: zero-shot classification (``fastclip_ds.eval.zeroshot``)."""
