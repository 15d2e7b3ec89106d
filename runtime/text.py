"""Tokenization for text-conditioned bundles, with the `tokenizers` library (no torch)."""

from __future__ import annotations

import numpy as np


def encode_batch(tokenizer, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (int64, (B, max_length)), padded and truncated to a fixed
    length as the exported text encoder expects. Matches transformers' BertTokenizer with
    padding="max_length", truncation=True."""
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=tokenizer.token_to_id("[PAD]") or 0)
    enc = tokenizer.encode_batch(list(prompts))
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask
