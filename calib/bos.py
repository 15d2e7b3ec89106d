"""MixDQ's BOS-aware text embedding (DESIGN §6): the first token of the text states keeps
full-precision activations in the layers that read the text-token sequence.

The reference encoder's first token ([CLS] of MiniLM; BOS of CLIP/T5-style encoders) is an
outlier (absmax ~5.5 against <= 2.1 for the other tokens of pixart-ref's states): in a layer
with one static activation scale per tensor it sets the scale, and every other token is
quantized on a grid too coarse for it. With `techniques.bos_aware: true` such a layer
computes the rows of token 0 from its unquantized input (the weight stays quantized as the
plan says) and quantizes only tokens 1.., with an amax calibrated without token 0. The
rows are computed per prompt (MiniLM is bidirectional: its [CLS] state depends on the whole
prompt, so they are not constants).

Which layers: every Linear whose input is the text-token sequence, i.e. whose input rows
are tokens of the text states —
  - PixArt: `caption_projection.linear_1` (the encoder states themselves, where the [CLS]
    outlier is), `caption_projection.linear_2` (per-token GELU of linear_1), and the key and
    value projections `attn2.to_k` / `attn2.to_v` of every block's cross-attention (they read
    caption_projection's output; attn2.to_q reads image tokens and is not one of them);
  - DiT has no text states (no caption_projection, no attn2): nothing.
Only layers whose activation the target quantizes with one static scale per tensor are
changed: weight-only layers (A16) have nothing to bypass, and per-token dynamic activations
(ViDiT-Q simulation, ONNX Runtime's MatMulNBits) already give token 0 its own scale.

Pure Python: the exporter reads it without torch.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from .plan import LayerPrecision, PlanError

# Module paths (diffusers names under `transformer.`) of the Linears that read text tokens.
TEXT_TOKEN_LAYER = re.compile(r"(^|\.)(caption_projection\.linear_[12]|attn2\.to_[kv])$")
TOKEN_AXIS = -2  # (batch, tokens, features): the Linear input as the model and the graph see it


def bos_aware(techniques: Mapping[str, Any]) -> bool:
    """`techniques.bos_aware` (default false); a PlanError for anything but true/false."""
    value = techniques.get("bos_aware", False)
    if not isinstance(value, bool):
        raise PlanError(f"techniques.bos_aware: expected true or false, got {value!r}")
    return value


def reads_text_tokens(module: str) -> bool:
    return TEXT_TOKEN_LAYER.search(module) is not None


def first_token_layers(techniques: Mapping[str, Any],
                       effective: Mapping[str, LayerPrecision]) -> list[str]:
    """The layers (of `effective`: module path -> effective precision on the target) whose
    first text token bypasses activation quantization: none unless `techniques.bos_aware`;
    else the text-token layers with a static per-tensor quantized activation."""
    if not bos_aware(techniques):
        return []
    return sorted(m for m, p in effective.items()
                  if reads_text_tokens(m) and p.a_bits < 16 and p.a_granularity == "per_tensor")


def text_token_layers(modules: Iterable[str]) -> list[str]:
    """The module paths of `modules` that read the text-token sequence (statistics are
    recorded for them with and without token 0)."""
    return sorted(m for m in modules if reads_text_tokens(m))
