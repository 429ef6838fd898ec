"""The Transformer's parts, named from the math (Vaswani et al., 2017).

Embeddings  E = W_tok[x] + W_pos[p] (+ W_type[s])
Attention   MultiHead(X) = Concat(head_1..head_h) W_O,  head_i = softmax(Q_i K_i^T / sqrt(d_k)) V_i
FFN         FFN(x) = act(x W_1 + b_1) W_2 + b_2
Block       pre-LN:  x + Attn(LN(x)), then x + FFN(LN(x))       (GPT-2)
            post-LN: LN(x + Attn(x)), then LN(x + FFN(x))       (BERT)

Q, K and V come from one fused projection (one GEMM instead of three: on a CPU at batch 1 the
matrix-vector products are bound by memory traffic, and one larger read streams better).

Inference (no autograd) takes a few shortcuts that change no value beyond rounding:

* A Linear may carry a oneDNN-prepacked copy of its weight (`pack_linear`): with more than one row
  per product (batched decoding, prefill, the encoder) oneDNN's blocked-layout GEMM beats
  `F.linear` markedly on a CPU — measured with 2 threads on this AVX-512 machine, GPT-2's weights
  x 8 rows: ~29 ms per step against ~38 ms (oneMKL, [in, out] layout), the 50257-row LM head
  7.8 ms against 11.3 ms. A single row keeps `F.linear` (oneMKL streams a [in, out] matrix faster).
  The packed copy is checked against the weight's storage and version counter on every call, so an
  optimiser step, `load_state_dict` or `.to()` silently falls back to the plain weight.
* With a packed weight the activation (GELU) and the residual addition run inside the GEMM as
  oneDNN post-ops instead of as separate passes over the activations.

Sequences of different lengths can also run *packed* (`VarLen`): the real tokens of every sequence
end to end, [N, D] instead of [B, T, D], so the projections, the FFN and the LayerNorms spend nothing
on padding; only attention sees the [B, T] layout, scattered into a zeroed buffer for the
softmax(Q K^T) V product and gathered back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .kv_cache import KVCache

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _unpacked() -> None:
    return None


class _Packed:
    """A oneDNN-prepacked weight plus what identifies the tensor it was packed from.

    Not part of the module's state: copies (deepcopy, pickle) drop it and use the plain weight.
    """

    __slots__ = ("dtype", "ptr", "version", "weight")

    def __init__(self, weight: torch.Tensor, source: torch.Tensor) -> None:
        self.weight = weight
        self.ptr = source.data_ptr()
        self.version = source._version
        self.dtype = source.dtype

    def __deepcopy__(self, memo: object) -> None:
        return None

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_unpacked, ())


def pack_linear(module: nn.Module, rows: int = 8) -> bool:
    """Give an `nn.Linear` a oneDNN-prepacked weight for inference (`rows`: the typical row count).

    Returns whether it did; a no-op without oneDNN, off the CPU, or for other dtypes/modules.
    """
    if not _ONEDNN or type(module) is not nn.Linear:
        return False
    w = module.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return False
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), max(1, rows))
    module._steward_packed = _Packed(packed, w)  # type: ignore[assignment]
    return True


def _packed(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The packed weight to use for `module(x)`, or None for the plain path."""
    p = module.__dict__.get("_steward_packed")
    if p is None or torch.is_grad_enabled() or x.dtype != p.dtype or x.numel() <= x.shape[-1]:
        return None
    w: torch.Tensor = module.weight  # type: ignore[assignment]
    if w.data_ptr() != p.ptr or w._version != p.version:
        return None
    return p.weight  # type: ignore[no-any-return]


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = _packed(module, x)
    if w is None:
        return module(x)  # type: ignore[no-any-return]
    return torch.ops.mkldnn._linear_pointwise(x, w, module.bias, "none", [], "")  # type: ignore[no-any-return]


def linear_act(module: nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """act(module(x)), the activation fused into the GEMM when the weight is packed."""
    w = _packed(module, x)
    if w is not None:
        if activation == "relu":
            return torch.ops.mkldnn._linear_pointwise(x, w, module.bias, "relu", [], "")  # type: ignore[no-any-return]
        algorithm = "tanh" if activation == "gelu_tanh" else "none"
        return torch.ops.mkldnn._linear_pointwise(x, w, module.bias, "gelu", [], algorithm)  # type: ignore[no-any-return]
    h = module(x)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "gelu":
        return F.gelu(h)
    return F.relu(h)


def linear_add(module: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + module(x), the addition fused into the GEMM when the weight is packed."""
    w = _packed(module, x)
    if w is None or not residual.is_contiguous():
        return residual + module(x)  # type: ignore[no-any-return]
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, module.bias, "add")  # type: ignore[no-any-return]


class VarLen:
    """Sequences of different lengths packed end to end: token i of sequence b is row
    `sum(lengths[:b]) + i` of an [N, ...] tensor, N = sum(lengths), with no padding rows.

    Holds what the packed layout needs, computed once per batch and shared by every layer: the
    rows' positions (0..length-1 within their sequence) and sequence numbers, and how attention
    reaches them. Consecutive sequences of the same length form a *run*, whose rows are already an
    unpadded [count, length] batch (a view, no copy, no mask); batches sorted by length (what
    `SentenceEncoder` forms) consist of a few runs. Otherwise (`runs` is None) attention scatters
    the rows into a zero-padded [B, T] layout at `index` and masks the padding with `mask`.
    """

    __slots__ = (
        "batch",
        "index",
        "lengths",
        "mask",
        "positions",
        "runs",
        "segments",
        "starts",
        "tokens",
        "width",
    )

    def __init__(
        self,
        lengths: Sequence[int] | torch.Tensor,
        device: torch.device | str | None = None,
        max_runs: int = 8,
    ) -> None:
        """`max_runs`: past this many runs, one padded, masked attention call is cheaper than one
        call per run."""
        host = [int(n) for n in lengths]
        if not host or min(host) < 1:
            raise ValueError("lengths must be a non-empty list of positive sequence lengths")
        self.lengths = torch.tensor(host, dtype=torch.long, device=device)
        self.batch = len(host)
        self.width = max(host)
        self.tokens = sum(host)  # N, the number of packed rows
        dev = self.lengths.device
        B, T = self.batch, self.width
        self.segments = torch.repeat_interleave(torch.arange(B, device=dev), self.lengths)
        self.starts = self.lengths.cumsum(0) - self.lengths
        self.positions = torch.arange(self.tokens, device=dev) - self.starts[self.segments]
        # (first row, sequence count, length) of each run of equal lengths.
        runs: list[tuple[int, int, int]] = []
        row = 0
        for n in host:
            if runs and runs[-1][2] == n:
                first, count, _ = runs[-1]
                runs[-1] = (first, count + 1, n)
            else:
                runs.append((row, 1, n))
            row += n
        self.runs: list[tuple[int, int, int]] | None = runs if len(runs) <= max_runs else None
        self.index: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        if self.runs is None:
            valid = torch.arange(T, device=dev)[None, :] < self.lengths[:, None]  # [B, T]
            self.index = valid.flatten().nonzero().squeeze(1)
            self.mask = valid[:, None, None, :]


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
        residual: torch.Tensor | None = None,
        varlen: VarLen | None = None,
    ) -> torch.Tensor:
        """Attention output; plus `residual` when given (inference only: no dropout).

        With `varlen`, `x` is [N, D], the sequences packed end to end (see `VarLen`); `mask`,
        `is_causal` and `cache` are then unused (bidirectional attention within each sequence).
        """
        if varlen is not None:
            return self._forward_varlen(x, varlen, residual)
        B, T, D = x.shape
        q, k, v = linear(self.qkv, x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if T == 1 and B > 1 and mask is None and not torch.is_grad_enabled():
            # One query per row against the cache: two batched products and a softmax run in about
            # half the time of the fused kernel, whose per-call set-up dominates at this size.
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.d_head**-0.5)
            y = torch.matmul(torch.softmax(scores, dim=-1), v)
        else:
            # softmax(Q K^T / sqrt(d_k)) V, with torch's fused kernel (scale defaults to 1/sqrt(d_k)).
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
            )
        y = y.transpose(1, 2).reshape(B, T, D)
        if residual is not None:
            return linear_add(self.out, y, residual)
        return linear(self.out, y)

    def _forward_varlen(self, x: torch.Tensor, varlen: VarLen, residual: torch.Tensor | None) -> torch.Tensor:
        D = x.shape[-1]
        H, dh = self.n_heads, self.d_head
        dropout = self.dropout if self.training else 0.0
        qkv = linear(self.qkv, x)  # [N, 3D]
        if varlen.runs is not None:
            # softmax(Q K^T / sqrt(d_k)) V per run of equal-length sequences: unmasked, and the
            # heads read straight out of the packed rows. Each output is [count, H, length, d_head]
            # stored as [count, length, H, d_head], i.e. already the packed rows of its run.
            parts = []
            for first, count, length in varlen.runs:
                rows = qkv[first : first + count * length].view(count, length, 3, H, dh)
                q, k, v = rows.permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
                parts.append(y.transpose(1, 2).reshape(count * length, D))
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            B, T = varlen.batch, varlen.width
            # Into the padded layout; padding rows stay zero (masked keys whose values must be
            # finite, since a masked weight of 0 times a NaN would still be a NaN).
            assert varlen.index is not None
            padded = qkv.new_zeros(B * T, 3 * D).index_copy_(0, varlen.index, qkv)
            q, k, v = padded.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=varlen.mask, dropout_p=dropout)
            y = y.transpose(1, 2).reshape(B * T, D).index_select(0, varlen.index)
        if residual is not None:
            return linear_add(self.out, y, residual)
        return linear(self.out, y)


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.activation = cfg.activation
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """FFN(x); plus `residual` when given (inference only: no dropout)."""
        h = linear_act(self.up, x, self.activation)
        if residual is not None:
            return linear_add(self.down, h, residual)
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
        varlen: VarLen | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], or [N, D] packed sequences with `varlen` (see `VarLen`)."""
        if self.training:
            if self.norm_first:
                a = self.attn(self.attn_norm(x), mask, is_causal, cache, layer, varlen=varlen)
                x = x + self.resid_dropout(a)
                return x + self.ffn(self.ffn_norm(x))  # type: ignore[no-any-return]
            x = self.attn_norm(
                x + self.resid_dropout(self.attn(x, mask, is_causal, cache, layer, varlen=varlen))
            )
            return self.ffn_norm(x + self.ffn(x))  # type: ignore[no-any-return]
        # Inference: the residual additions happen inside the output projections (see linear_add).
        if self.norm_first:
            x = self.attn(self.attn_norm(x), mask, is_causal, cache, layer, residual=x, varlen=varlen)
            return self.ffn(self.ffn_norm(x), residual=x)  # type: ignore[no-any-return]
        x = self.attn_norm(self.attn(x, mask, is_causal, cache, layer, residual=x, varlen=varlen))
        return self.ffn_norm(self.ffn(x, residual=x))  # type: ignore[no-any-return]


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
