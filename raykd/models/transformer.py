"""A tiny BERT-shaped token model for the NLP distillation losses (DistilBERT, TinyBERT, token-level
LM KD). Module names follow Hugging Face BERT (``embeddings``, ``encoder.layer.{i}``) so layer
mappings written for BERT read the same here.
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.models.args import BadArgs, PositiveInt, Probability


class TokenEmbeddings(nn.Module):
    """Word + learned position embeddings → LayerNorm → dropout (BERT's embedding block)."""

    def __init__(self, vocab_size: int, hidden: int, max_len: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)  # HF's spelling, so BERT-style paths carry over
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_len "
                             f"{self.position_embeddings.num_embeddings} of this model")
        positions = torch.arange(length, device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that can also expose its attention probabilities.

    TinyBERT distils per-head attention maps, which the stock layer never computes (it asks
    attention for ``need_weights=False``). Here they pass through the identity module
    ``attn_probs`` as ``[B, heads, L, L]``, so hooking ``encoder.layer.{i}.attn_probs`` captures
    them. They are only computed while something hooks ``attn_probs``: otherwise the fused
    attention kernel (which cannot return weights) stays in use.
    """

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__(hidden, heads, dim_feedforward=ffn, dropout=dropout, activation="gelu",
                         batch_first=True)
        self.attn_probs = nn.Identity()

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        # Overrides the parent's self-attention step: same computation, optionally with weights.
        # (A hook anywhere in this layer already disables the parent's fused fast path, so this
        # method runs whenever attn_probs is hooked.)
        wanted = bool(self.attn_probs._forward_hooks or self.attn_probs._forward_pre_hooks)
        out, weights = self.self_attn(x, x, x, attn_mask=attn_mask,
                                      key_padding_mask=key_padding_mask, need_weights=wanted,
                                      average_attn_weights=False, is_causal=is_causal)
        if wanted:
            self.attn_probs(weights)
        return self.dropout1(out)


class Encoder(nn.Module):
    """Holds ``layer`` (a ModuleList) so paths read ``encoder.layer.{i}`` as in HF BERT."""

    def __init__(self, layers: int, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(hidden, heads, ffn, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class TinyTransformer(nn.Module):
    """Token ids ``[B, L]`` (LongTensor) → logits.

    Module paths:

    - ``embeddings``: ``[B, L, hidden]`` (TinyBERT's embedding-layer loss);
      ``embeddings.word_embeddings``, ``embeddings.position_embeddings``, ``embeddings.LayerNorm``.
    - ``encoder.layer.{i}``: hidden states after layer *i*, ``[B, L, hidden]``.
    - ``encoder.layer.{i}.attn_probs``: per-head attention probabilities ``[B, heads, L, L]``.
    - ``encoder.layer.{i}.self_attn``, ``.linear1``, ``.linear2``, ``.norm1``, ``.norm2``: the
      usual ``nn.TransformerEncoderLayer`` parts.
    - ``head``: with ``lm_head`` per-token vocabulary logits ``[B, L, vocab_size]``; otherwise the
      classifier on the first token (the [CLS] position), ``[B, num_classes]``.
    """

    takes_tokens = True  # lets callers build an example input of token ids instead of images

    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, max_len: int,
                 num_classes: int, lm_head: bool = False, ffn: int | None = None,
                 dropout: float = 0.1):
        super().__init__()
        self.vocab_size, self.hidden, self.max_len = vocab_size, hidden, max_len
        self.lm_head = lm_head
        self.embeddings = TokenEmbeddings(vocab_size, hidden, max_len, dropout)
        self.encoder = Encoder(layers, hidden, heads, ffn or 4 * hidden, dropout)
        self.head = nn.Linear(hidden, vocab_size if lm_head else num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embeddings(ids))
        return self.head(x if self.lm_head else x[:, 0])

    def describe(self) -> str:
        return (f"tiny_transformer(hidden={self.hidden}, layers={len(self.encoder.layer)}, "
                f"vocab_size={self.vocab_size})")


def build_tiny_transformer(info, *, vocab_size: PositiveInt | None = None, hidden: PositiveInt = 64,
                           layers: PositiveInt = 2, heads: PositiveInt = 2,
                           max_len: PositiveInt | None = None,
                           num_classes: PositiveInt | None = None,
                           lm_head: bool = False, ffn: PositiveInt | None = None,
                           dropout: Probability = 0.1) -> TinyTransformer:
    """Defaults come from the dataset where it knows them: ``vocab_size`` from ``info.vocab_size``
    (else 1000), ``max_len`` from a 1-D ``info.input_shape`` ``(L,)`` (else 128), ``num_classes``
    from ``info.num_classes``; ``ffn`` defaults to 4×hidden as in BERT."""
    if hidden % heads:
        raise BadArgs(f"hidden={hidden} is not divisible by heads={heads} for model "
                      f"tiny_transformer; allowed: heads that divide hidden")
    shape = tuple(getattr(info, "input_shape", ()))
    vocab_size = vocab_size or getattr(info, "vocab_size", None) or 1000
    max_len = max_len or (shape[0] if len(shape) == 1 else 128)
    num_classes = num_classes or info.num_classes
    return TinyTransformer(vocab_size, hidden, layers, heads, max_len, num_classes, lm_head, ffn,
                           dropout)
