"""The Transformer's parts, named from the math (Vaswani et al., 2017).

Embeddings  E = W_tok[x] + W_pos[p] (+ W_type[s])
Attention   MultiHead(X) = Concat(head_1..head_h) W_O,  head_i = softmax(Q_i K_i^T / sqrt(d_k)) V_i
FFN         FFN(x) = act(x W_1 + b_1) W_2 + b_2
Block       pre-LN:  x + Attn(LN(x)), then x + FFN(LN(x))       (GPT-2)
            post-LN: LN(x + Attn(x)), then LN(x + FFN(x))       (BERT)

Q, K and V come from one fused projection (one GEMM instead of three: on a CPU at batch 1 the
matrix-vector products are bound by memory traffic, and one larger read streams better).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .kv_cache import KVCache


class Embeddings(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.token(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                # Segment 0 for every token: one row broadcast instead of a gather per token.
                x = x + self.token_type.weight[0]
            else:
                x = x + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)  # type: ignore[no-any-return]


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # softmax(Q K^T / sqrt(d_k)) V, with torch's fused kernel (scale defaults to 1/sqrt(d_k)).
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.out(y.transpose(1, 2).reshape(B, T, D))  # type: ignore[no-any-return]


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.activation = cfg.activation
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return self.dropout(self.down(h))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = MultiHeadAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        if self.norm_first:
            x = x + self.resid_dropout(self.attn(self.attn_norm(x), mask, is_causal, cache, layer))
            return x + self.ffn(self.ffn_norm(x))  # type: ignore[no-any-return]
        x = self.attn_norm(x + self.resid_dropout(self.attn(x, mask, is_causal, cache, layer)))
        return self.ffn_norm(x + self.ffn(x))  # type: ignore[no-any-return]


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2's initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02
            if name.endswith("attn.out.weight") or name.endswith("ffn.down.weight"):
                std = 0.02 / math.sqrt(2 * n_layers)
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
