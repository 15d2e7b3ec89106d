"""T5 text states for PixArt checkpoints.

effgen does not ship, export or run PixArt's text encoder (T5-v1.1-XXL, 4.7B parameters: a
model larger than the denoiser it conditions); the runtime (`effgen generate --prompt-embeds`)
and calibration (`--prompts STATES.safetensors`) take its states precomputed, in the text
states format of runtime/text.py. `encode_prompts` computes them from the checkpoint folder's
own `text_encoder/` and `tokenizer/` with transformers, offline, as diffusers' PixArt
pipelines do: each prompt padded and truncated to the model's text length (120 tokens for
PixArt-alpha, 300 for Sigma) with its attention mask, the negative prompt ("" by default)
encoded the same way. diffusers can also clean captions first (`clean_caption=True`, with bs4
and ftfy); effgen encodes the prompts as given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .denoiser import torch_device

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def load_t5(checkpoint: str | Path, dtype: str = "bfloat16", device: str = "cpu"):
    """(tokenizer, T5 encoder) from a diffusers PixArt folder, local files only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    from transformers import AutoTokenizer, T5EncoderModel

    folder = Path(checkpoint)
    for sub in ("text_encoder", "tokenizer"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder} has no {sub}/ folder: encode-prompts reads the "
                                    "text encoder of a diffusers PixArt checkpoint")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    dev = torch_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        encoder = T5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                 use_safetensors=True, dtype=DTYPES[dtype])
    except OSError as e:  # missing or unreadable files, .bin-only weights
        raise ValueError(f"{folder}: cannot load its T5 text encoder: {str(e).splitlines()[0]}") from None
    return tokenizer, encoder.to(dev).eval()


@torch.no_grad()
def encode_prompts(checkpoint: str | Path, prompts: Sequence[str], max_length: int, dim: int,
                   negative_prompt: str = "", dtype: str = "bfloat16", device: str = "cpu",
                   batch: int = 8, progress: bool = True) -> dict[str, np.ndarray]:
    """The arrays of a text states file for `prompts` (float32): `prompt_embeds` (N, L, D),
    `prompt_attention_mask` (N, L), `negative_prompt_embeds` (1, L, D) and
    `negative_prompt_attention_mask` (1, L), with L = `max_length`; `dim` is what the model
    reads (4096 for T5-XXL), checked."""
    from tqdm import tqdm

    if not prompts:
        raise ValueError("no prompts to encode")
    tokenizer, encoder = load_t5(checkpoint, dtype, device)
    if encoder.config.d_model != dim:
        raise ValueError(f"{checkpoint}: its text encoder gives {encoder.config.d_model}-wide "
                         f"states, the model reads {dim}")
    texts = list(prompts) + [negative_prompt]
    states, masks = [], []
    for start in tqdm(range(0, len(texts), batch), desc="T5 text states", unit="batch",
                      file=sys.stderr, disable=not progress):
        tok = tokenizer(texts[start:start + batch], padding="max_length", max_length=max_length,
                        truncation=True, add_special_tokens=True, return_tensors="pt")
        out = encoder(tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))[0]
        states.append(out.float().cpu().numpy())
        masks.append(tok.attention_mask.numpy().astype(np.float32))
    s, m = np.concatenate(states), np.concatenate(masks)
    return {"prompt_embeds": s[:-1], "prompt_attention_mask": m[:-1],
            "negative_prompt_embeds": s[-1:], "negative_prompt_attention_mask": m[-1:]}
