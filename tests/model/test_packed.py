"""oneDNN-packed Linear weights and the fused inference paths: same numbers, safe fallbacks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steward.model import Decoder, Encoder, TransformerConfig
from steward.model.kv_cache import KVCache
from steward.model.layers import _ONEDNN, linear, linear_act, linear_add, pack_linear

needs_onednn = pytest.mark.skipif(not _ONEDNN, reason="torch built without oneDNN")


def small(**kw: object) -> TransformerConfig:
    base: dict[str, object] = dict(
        vocab_size=97, max_positions=48, d_model=32, n_heads=4, n_layers=2, d_ff=64
    )
    base.update(kw)
    return TransformerConfig(**base)  # type: ignore[arg-type]


@needs_onednn
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_packed_linear_matches_plain(activation: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(48, 80)
    x = torch.randn(3, 5, 48)
    r = torch.randn(3, 5, 80)
    ref = lin(x)
    act = {"gelu": F.gelu, "relu": F.relu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}[activation]
    assert pack_linear(lin, 8)
    with torch.inference_mode():
        torch.testing.assert_close(linear(lin, x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear_act(lin, x, activation), act(ref), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(linear_add(lin, x, r), r + ref, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_weight_is_ignored_once_the_weight_changes_or_autograd_is_on() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    x = torch.randn(4, 16)
    pack_linear(lin, 4)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an optimiser step, load_state_dict, ...: bumps the version counter
    with torch.inference_mode():
        torch.testing.assert_close(linear(lin, x), F.linear(x, lin.weight, lin.bias))
    y = linear(lin, x)  # autograd on: the plain, differentiable path
    assert y.requires_grad
    lin.to(torch.float64)  # a new storage
    with torch.inference_mode():
        out = linear(lin, x.double())
    assert out.dtype == torch.float64


@needs_onednn
def test_copies_drop_the_packed_weight() -> None:
    lin = nn.Linear(8, 8)
    pack_linear(lin, 2)
    assert lin.__dict__.get("_steward_packed") is not None
    assert copy.deepcopy(lin).__dict__.get("_steward_packed") is None
    assert pickle.loads(pickle.dumps(lin)).__dict__.get("_steward_packed") is None
    assert set(lin.state_dict()) == {"weight", "bias"}


@needs_onednn
def test_packed_decoder_batch_matches_unpacked() -> None:
    torch.manual_seed(0)
    a = Decoder(small()).eval()
    b = copy.deepcopy(a)
    ids = torch.randint(0, 97, (4, 6))
    a.use_decoding_layout(batch_size=4)  # packs
    b.use_decoding_layout(batch_size=1)  # does not
    assert a.lm_head.__dict__.get("_steward_packed") is not None
    assert b.lm_head.__dict__.get("_steward_packed") is None
    with torch.inference_mode():
        ca = a.new_cache(4, 16)
        cb = b.new_cache(1, 16)  # the batch-1 cache call keeps b unpacked
        cb = KVCache(2, 4, 4, 16, 8)
        la = a(ids, cache=ca, last_only=True)
        lb = b(ids, cache=cb, last_only=True)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
        for _ in range(5):
            nxt = la[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(nxt, lb[:, -1].argmax(-1, keepdim=True))
            la, lb = a(nxt, cache=ca, last_only=True), b(nxt, cache=cb, last_only=True)
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_packed_encoder_matches_unpacked() -> None:
    torch.manual_seed(0)
    cfg = small(
        arch="encoder",
        norm_first=False,
        embedding_norm=True,
        final_norm=False,
        type_vocab_size=2,
        activation="gelu",
    )
    a = Encoder(cfg).eval()
    b = copy.deepcopy(a)
    a.pack_weights()
    ids = torch.randint(0, 97, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.inference_mode():
        torch.testing.assert_close(a(ids, mask), b(ids, mask), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a(ids), b(ids), atol=1e-5, rtol=1e-5)
    # Training is untouched by the packed copy: gradients flow through the plain weights.
    a.train()
    a(ids, mask).sum().backward()
    assert a.blocks[0].ffn.up.weight.grad is not None
