"""The stacks themselves: shapes, masking, KV cache, padding invariance, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from steward.model import ConfigError, Decoder, Encoder, InputError, TransformerConfig


def small(**kw: object) -> TransformerConfig:
    base: dict[str, object] = dict(
        vocab_size=97, max_positions=48, d_model=32, n_heads=4, n_layers=2, d_ff=64
    )
    base.update(kw)
    return TransformerConfig(**base)  # type: ignore[arg-type]


def encoder_cfg(**kw: object) -> TransformerConfig:
    return small(
        arch="encoder",
        norm_first=False,
        embedding_norm=True,
        final_norm=False,
        type_vocab_size=2,
        activation="gelu",
        **kw,
    )


def test_attention_is_the_textbook_formula() -> None:
    """One head, no projections: MultiHeadAttention's core equals softmax(QK^T/sqrt(d_k))V."""
    m = Decoder(small(n_heads=1, n_layers=1)).eval()
    attn = m.blocks[0].attn
    x = torch.randn(1, 5, 32)
    qkv = attn.qkv(x)
    q, k, v = qkv.split(32, dim=-1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(32)
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    expected = attn.out(torch.softmax(scores, dim=-1) @ v)
    got = attn(x, None, True)
    assert torch.allclose(got, expected, atol=1e-5)


def test_decoder_is_causal() -> None:
    m = Decoder(small()).eval()
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    a, b = m(ids), m(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_encoder_is_bidirectional_and_pads_are_ignored() -> None:
    e = Encoder(encoder_cfg()).eval()
    ids = torch.randint(0, 97, (1, 10))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 97
    assert not torch.allclose(e(ids)[:, 0], e(changed)[:, 0], atol=1e-4)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], dim=1).long()
    assert torch.allclose(e.embed_pooled(padded, mask), e.embed_pooled(ids), atol=1e-5)


def test_kv_cache_matches_full_forward() -> None:
    m = Decoder(small()).eval()
    ids = torch.randint(0, 97, (3, 20))
    full = m(ids)
    cache = m.new_cache(3, 20)
    parts = [m(ids[:, :7], cache=cache)]
    for t in range(7, 20):
        parts.append(m(ids[:, t : t + 1], cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_left_padding_gives_the_same_numbers_as_the_row_alone() -> None:
    m = Decoder(small()).eval()
    a = torch.randint(0, 97, (1, 9))
    b = torch.randint(0, 97, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    out = m(ids, mask)
    assert torch.allclose(out[0], m(a)[0], atol=1e-5)
    assert torch.allclose(out[1, 4:], m(b)[0], atol=1e-5)
    assert torch.isfinite(out).all()
    # and through the cache, one token at a time after the padded prompt
    cache = m.new_cache(2, 12)
    m(ids, mask, cache=cache)
    nxt = torch.tensor([[3], [5]])
    step = m(nxt, cache=cache)
    assert torch.allclose(step[1, 0], m(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5)


def test_tied_head_shares_the_embedding() -> None:
    m = Decoder(small())
    assert m.lm_head.weight.data_ptr() == m.embed.token.weight.data_ptr()
    untied = Decoder(small(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embed.token.weight.data_ptr()


def test_loss_is_cross_entropy_and_trains() -> None:
    m = Decoder(small())
    ids = torch.randint(0, 97, (4, 16))
    logits = m(ids[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1))
    assert torch.allclose(m.loss(ids[:, :-1], ids[:, 1:]), expected)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = float(m.loss(ids[:, :-1], ids[:, 1:]).detach())
    for _ in range(30):
        loss = m.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < first * 0.5


def test_classifier_head() -> None:
    e = Encoder(encoder_cfg(num_labels=3))
    assert e.classify(torch.randint(0, 97, (2, 7))).shape == (2, 3)
    with pytest.raises(ValueError, match="no classification head"):
        Encoder(encoder_cfg()).classify(torch.randint(0, 97, (1, 3)))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"d_model": 30}, "divisible"),
        ({"n_layers": 0}, "n_layers"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.5}, "dropout"),
        ({"arch": "rnn"}, "arch"),
    ],
)
def test_bad_config_is_named(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small(**kw)


def test_unknown_config_key() -> None:
    with pytest.raises(ConfigError, match="unknown model config keys: colour"):
        TransformerConfig.from_dict({"colour": "blue"})


def test_input_errors() -> None:
    m = Decoder(small())
    with pytest.raises(InputError, match="exceeds the model's context of 48"):
        m(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[batch, time\]"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError, match="attention_mask shape"):
        m(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5))
    cache = m.new_cache(1, 48)
    m(torch.zeros(1, 40, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="exceeds"):
        m(torch.zeros(1, 9, dtype=torch.long), cache=cache)
