"""Reduced-precision decoders and the decoding weight layout: same answers, fewer bytes."""

from __future__ import annotations

import pytest
import torch

from steward.model import Decoder, TransformerConfig
from steward.model.quantize import Int8Linear, quantize_decoder, weight_bytes_per_token


def _decoder(tie: bool = True) -> Decoder:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=96, max_positions=64, d_model=64, n_heads=4, n_layers=2, d_ff=128, tie_embeddings=tie
    )
    return Decoder(cfg).eval()


def _greedy(model: Decoder, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
        logits = model(ids, cache=cache, last_only=True)
        out = []
        for _ in range(n):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            logits = model(token, cache=cache, last_only=True)
    return torch.cat(out, 1)


def test_decoding_layout_changes_strides_not_values() -> None:
    model = _decoder()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        model.new_cache(1, 4)  # switches the layout, even under inference mode
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.shape == (192, 64) and qkv.stride() == (1, 192)
    assert model.lm_head.weight is model.embed.token.weight  # the tie survives
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.inference_mode():
        assert torch.allclose(model(ids), before, atol=1e-5)
    # Still a normal, trainable module: parameters are not inference tensors.
    model.train()
    model.loss(ids, ids).backward()
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape


def test_decoding_layout_is_idempotent() -> None:
    model = _decoder()
    model.use_decoding_layout()
    ptr = model.blocks[0].ffn.up.weight.data_ptr()
    model.use_decoding_layout()
    assert model.blocks[0].ffn.up.weight.data_ptr() == ptr


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_quantized_copy_is_close_and_generates(precision: str) -> None:
    model = _decoder()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids)
    q = quantize_decoder(model, precision)  # type: ignore[arg-type]
    with torch.inference_mode():
        got = q(ids).float()
    err = (got - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
    assert next(model.parameters()).dtype == torch.float32  # the source is untouched
    if precision == "int8":
        assert isinstance(q.lm_head, Int8Linear)
        assert q.new_cache(1, 8).k.dtype == torch.float32  # cache follows activations, not int8
    tokens = _greedy(q, ids, 6)
    assert tokens.shape == (1, 6)


def test_weight_bytes_per_token_counts_the_tied_head_once() -> None:
    tied, untied = _decoder(tie=True), _decoder(tie=False)
    cfg = tied.config
    per_block = sum(p.numel() for p in tied.blocks[0].parameters()) * 4
    head = cfg.vocab_size * cfg.d_model * 4
    norm = 2 * cfg.d_model * 4
    row = cfg.d_model * 4
    assert weight_bytes_per_token(tied) == cfg.n_layers * per_block + norm + head + row
    assert weight_bytes_per_token(untied) == cfg.n_layers * per_block + norm + head + 2 * row
    q = quantize_decoder(tied, "int8")
    assert weight_bytes_per_token(q) < weight_bytes_per_token(tied) / 3


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        quantize_decoder(_decoder(), "fp8")  # type: ignore[arg-type]
