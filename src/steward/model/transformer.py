"""The two stacks: a causal decoder (GPT-style) and a bidirectional encoder (BERT-style).

Decoder: logits = LN_f(Block_L(...Block_1(E(x)))) W_tok^T        (LM head tied to the embeddings)
Encoder: H = Block_L(...Block_1(LN(E(x))));  pooled = mean_t(H_t over real tokens)

Both take `forward(input_ids, attention_mask=None)`; the decoder returns logits [B, T, V], the encoder
hidden states [B, T, H]. Padding is described by `attention_mask` (1 = real token, 0 = pad), as in
Hugging Face. In the decoder, position ids follow from the mask, so a left-padded row (the layout
generation needs) gets the same positions — and the same numbers — as the row alone. The encoder
numbers positions 0..T-1 like BERT and expects right padding, which is what batching for embeddings
and classification uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerConfig
from .kv_cache import KVCache
from .layers import Block, Embeddings, VarLen, init_weights, linear, pack_linear


class InputError(ValueError):
    """Inputs that the model cannot take (too long, wrong shape, ids out of range)."""


def _check_ids(cfg: TransformerConfig, input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")


class Decoder(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.arch != "decoder":
            raise ValueError("Decoder needs a config with arch='decoder'")
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.token.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for incremental decoding; switches the weights to the decoding layout first."""
        self.use_decoding_layout(batch_size)
        cfg = self.config
        # Keys and values have the activations' dtype, i.e. the embeddings' — not the LM head's,
        # which a quantised copy (steward.model.quantize) stores as int8.
        w = self.embed.token.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            cfg.n_heads,
            max_len,
            cfg.d_head,
            dtype=dtype or w.dtype,
            device=w.device,
        )

    def use_decoding_layout(self, batch_size: int = 1) -> None:
        """Store every fp32 Linear weight (the tied embedding included) transposed in memory, once;
        for batched decoding (`batch_size` > 1) also give each Linear a oneDNN-packed copy.

        Values, shapes and the state dict stay the same; only the strides change, so that
        `F.linear(x, W)` multiplies by a contiguous [in, out] matrix — the layout GPT-2's Conv1D
        keeps. With a single row (batch-1 decoding) oneMKL streams that layout fastest: the
        50257-row LM head at ~27 GB/s against ~19 GB/s for [out, in]. With several rows oneDNN's
        prepacked GEMM is faster still (see `steward.model.layers`), at the cost of a second copy of
        the weights in memory, which is why batch-1 generation does not make it. It happens on the
        first `new_cache`, i.e. only in models that generate; training never calls it, so its
        optimizer state keeps matching its parameters' layout (and a packed copy is ignored as
        soon as an optimizer step changes a weight).
        """
        with torch.inference_mode(False), torch.no_grad():
            for module in self.modules():
                w = module.weight if isinstance(module, nn.Linear) else None
                if w is not None and w.dtype == torch.float32 and w.stride() != (1, w.shape[0]):
                    w.data = w.data.t().contiguous().t()
        if batch_size > 1:
            self.pack_weights(batch_size)

    def pack_weights(self, rows: int = 8) -> None:
        """oneDNN-packed copies of every Linear weight for inference (see `steward.model.layers`)."""
        for module in self.modules():
            p = module.__dict__.get("_steward_packed")
            w = module.weight if isinstance(module, nn.Linear) else None
            if p is not None and w is not None and (p.ptr, p.version) == (w.data_ptr(), w._version):
                continue  # already packed from these very numbers
            pack_linear(module, rows)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`).

        With a cache, `input_ids` are the new tokens only and `attention_mask` (if any) covers the
        new tokens only; the cache remembers earlier padding.
        """
        x = self.hidden_states(input_ids, attention_mask, position_ids, cache, last_only)
        return linear(self.lm_head, x)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Final hidden states [B, T, D] (or [B, 1, D] with `last_only`: the final norm then runs on
        the last position only)."""
        cfg = self.config
        _check_ids(cfg, input_ids)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if (
            T == 1
            and cache is not None
            and attention_mask is None
            and position_ids is None
            and not cache.has_padding
            and past < cfg.max_positions
            and not self.training
        ):
            return self._decode_step(input_ids, cache)
        if past + T > cfg.max_positions:
            raise InputError(
                f"sequence of {past + T} tokens exceeds the model's context of {cfg.max_positions}"
            )
        device = input_ids.device
        new_mask = None if attention_mask is None else attention_mask.to(device=device).bool()
        if new_mask is not None and new_mask.shape != (B, T):
            raise InputError(
                f"attention_mask shape {tuple(new_mask.shape)} does not match input_ids {(B, T)}"
            )
        if new_mask is not None and bool(new_mask.all()) and (cache is None or not cache.has_padding):
            new_mask = None  # no padding anywhere: take the fast unmasked kernels

        if position_ids is None:
            if new_mask is None and (cache is None or not cache.has_padding):
                position_ids = torch.arange(past, past + T, device=device).expand(B, T)
            else:
                m = new_mask if new_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
                base = cache.valid_count[:, None] if cache is not None else 0
                position_ids = (base + m.long().cumsum(1) - 1).clamp(min=0)

        attn_mask: torch.Tensor | None = None
        is_causal = False
        if cache is not None:
            if new_mask is None:
                cache.record_real(T)
            else:
                cache.record(new_mask)
        if cache is not None and cache.has_padding:
            keys_valid = cache.key_valid[:, : past + T]
            attn_mask = _causal_mask(T, past, keys_valid)
        elif new_mask is not None:
            attn_mask = _causal_mask(T, past, new_mask)
        elif T > 1 and past == 0:
            is_causal = True
        elif T > 1:
            attn_mask = _causal_mask(T, past, None, device=device)
        # else: one new token attending to every cached key needs no mask at all.

        x = self.embed(input_ids, position_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        if self.norm is not None:
            x = self.norm(x)
        return x  # type: ignore[no-any-return]

    def _decode_step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row, nothing padded: the common decoding step, with no mask, no
        position tensor (every row is at the same position) and no host synchronisation."""
        past = cache.length
        cache.record_real(1)
        emb = self.embed
        if emb.token_type is None and emb.norm is None:
            x = emb.token(input_ids) + emb.position.weight[past]
        else:
            x = emb(input_ids, torch.full_like(input_ids, past))
        for i, block in enumerate(self.blocks):
            x = block(x, None, False, cache, i)
        cache.advance(1)
        if self.norm is not None:
            x = self.norm(x)
        return x  # type: ignore[no-any-return]

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; targets of -100 are ignored (prompt or padding)."""
        logits = self(input_ids)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
        )


def _causal_mask(
    T: int, past: int, keys_valid: torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean [B|1, 1, T, past+T] mask: query i sees key j iff j <= past+i and key j is real.

    A query always sees itself, so a padding query (whose earlier keys are all padding) yields a
    finite, ignored output instead of a NaN that would poison nothing but still trips anomaly checks.
    """
    S = past + T
    dev = keys_valid.device if keys_valid is not None else device
    q_pos = torch.arange(past, S, device=dev)[:, None]
    k_pos = torch.arange(S, device=dev)[None, :]
    causal = k_pos <= q_pos  # [T, S]
    if keys_valid is None:
        return causal[None, None]
    mask = causal[None] & keys_valid[:, None, :]
    mask |= k_pos == q_pos
    return mask[:, None]


class Encoder(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.arch != "encoder":
            raise ValueError("Encoder needs a config with arch='encoder'")
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.final_norm else None
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels > 0 else None
        init_weights(self, cfg.n_layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pack_weights(self, rows: int = 512) -> None:
        """oneDNN-packed copies of every Linear weight for inference (see `steward.model.layers`):
        faster encoding at the cost of a second copy of the weights in memory."""
        for module in self.modules():
            pack_linear(module, rows)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, H]."""
        cfg = self.config
        _check_ids(cfg, input_ids)
        B, T = input_ids.shape
        if cfg.max_positions < T:
            raise InputError(f"sequence of {T} tokens exceeds the model's context of {cfg.max_positions}")
        attn_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise InputError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match {(B, T)}"
                )
            if not bool(attention_mask.bool().all()):
                attn_mask = attention_mask.bool()[:, None, None, :]
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed(input_ids, positions, token_type_ids)
        for block in self.blocks:
            x = block(x, attn_mask, False)
        if self.norm is not None:
            x = self.norm(x)
        return x  # type: ignore[no-any-return]

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        varlen: VarLen,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [N, H] of sequences packed end to end (no padding; see `VarLen`).

        `input_ids` [N] holds the sequences' tokens one after another, `varlen` their lengths. The
        numbers are those of `forward` on the right-padded batch, at the real tokens; the
        projections and the FFN just skip the padding.
        """
        cfg = self.config
        if input_ids.dim() != 1 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise InputError(
                f"packed input_ids must be a 1-D tensor of token ids, got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() != varlen.tokens:
            raise InputError(f"{input_ids.numel()} packed tokens, but the lengths add up to {varlen.tokens}")
        if cfg.max_positions < varlen.width:
            raise InputError(
                f"sequence of {varlen.width} tokens exceeds the model's context of {cfg.max_positions}"
            )
        x = self.embed(input_ids, varlen.positions, token_type_ids)
        for block in self.blocks:
            x = block(x, None, False, varlen=varlen)
        if self.norm is not None:
            x = self.norm(x)
        return x  # type: ignore[no-any-return]

    def pool_packed(self, hidden: torch.Tensor, varlen: VarLen) -> torch.Tensor:
        """`pool` for packed hidden states [N, H]: [B, H], one row per sequence."""
        return pool_packed(hidden, varlen, self.config.pooling)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def embed_pooled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Sentence embeddings [B, H]: mean of real-token states, L2-normalised by default."""
        pooled = self.pool(self(input_ids, attention_mask), attention_mask)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, num_labels] from the pooled representation."""
        if self.classifier is None:
            raise ValueError("this encoder has no classification head (num_labels=0)")
        return linear(self.classifier, self.pool(self(input_ids, attention_mask), attention_mask))


def pool_packed(hidden: torch.Tensor, varlen: VarLen, pooling: str) -> torch.Tensor:
    """Packed hidden states [N, H] pooled per sequence: [B, H], the first token's state ("cls") or
    the mean of the sequence's states (anything else)."""
    if pooling == "cls":
        return hidden[varlen.starts]
    sums = hidden.new_zeros(varlen.batch, hidden.shape[-1]).index_add_(0, varlen.segments, hidden)
    return sums / varlen.lengths.to(hidden.dtype)[:, None]


def build_model(cfg: TransformerConfig) -> Decoder | Encoder:
    return Decoder(cfg) if cfg.arch == "decoder" else Encoder(cfg)
