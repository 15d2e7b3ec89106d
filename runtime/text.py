"""Tokenization for text-conditioned bundles, with the `tokenizers` library (no torch)."""

from __future__ import annotations

from pathlib import Path

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


# --- precomputed text states ---------------------------------------------------------------
# Text encoders effgen does not ship or export (PixArt's T5-XXL, 4.7B parameters) condition a
# model through states computed elsewhere (`effgen encode-prompts` from the checkpoint's own
# text_encoder/): one file format for `effgen generate --prompt-embeds` and for calibration.

TEXT_STATES_FORMAT = "effgen.text_states/1"


def read_text_states(path) -> dict[str, np.ndarray]:
    """A text states file: `.safetensors` with `prompt_embeds` (N, L, D) and optionally
    `prompt_attention_mask` (N, L), `negative_prompt_embeds` and
    `negative_prompt_attention_mask` (1 or N rows), as `effgen encode-prompts` writes it; or
    `.npy` with the prompt states alone."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text states file {path} does not exist")

    try:
        if path.suffix == ".npy":
            return {"prompt_embeds": np.load(path, allow_pickle=False)}
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as e:  # truncated or not this format
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable text states file ({first})") from None
    raise ValueError(f"{path}: text states must be a .npy or .safetensors file")


def text_state_rows(e: dict[str, np.ndarray], max_length: int, dim: int, n: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(states, mask, negative states, negative mask), float32, `n` rows each (default: the
    file's rows), from the arrays of a text states file. Rows given once are repeated; without
    a negative, the unconditional branch sees zero states behind one valid token."""
    shape = (max_length, dim)
    if "prompt_embeds" not in e:
        raise ValueError("text states have no 'prompt_embeds' array")
    if n is None:
        n = len(e["prompt_embeds"]) if np.ndim(e["prompt_embeds"]) == 3 else 1

    def rows(name, row_shape):
        x = np.asarray(e[name], np.float32)
        x = x[None] if x.ndim == len(row_shape) else x
        if x.shape[1:] != row_shape or len(x) not in (1, n):
            raise ValueError(f"{name} must have shape {row_shape} or (N, {', '.join(map(str, row_shape))}) "
                             f"with N = 1 or {n} for this model, got {tuple(x.shape)}")
        return np.broadcast_to(x, (n, *row_shape))

    cond = rows("prompt_embeds", shape)
    if not np.isfinite(cond).all():
        raise ValueError("prompt_embeds holds NaN or infinite values")
    ones = np.ones((n, max_length), np.float32)
    cmask = rows("prompt_attention_mask", (max_length,)) if "prompt_attention_mask" in e else ones
    if "negative_prompt_embeds" in e:
        unc = rows("negative_prompt_embeds", shape)
        umask = (rows("negative_prompt_attention_mask", (max_length,))
                 if "negative_prompt_attention_mask" in e else ones)
    else:
        unc = np.zeros_like(cond)
        umask = np.zeros((n, max_length), np.float32)
        umask[:, 0] = 1
    return cond, cmask, unc, umask
