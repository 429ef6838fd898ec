"""Packed (unpadded) encoding: `Encoder.forward_packed` gives `forward`'s numbers at the real tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from steward.model import Encoder, InputError, TransformerConfig
from steward.model.layers import VarLen


def encoder_config(**kw: object) -> TransformerConfig:
    base: dict[str, object] = dict(
        arch="encoder",
        vocab_size=97,
        max_positions=48,
        d_model=32,
        n_heads=4,
        n_layers=2,
        d_ff=64,
        norm_first=False,
        embedding_norm=True,
        final_norm=False,
        type_vocab_size=2,
        activation="gelu",
    )
    base.update(kw)
    return TransformerConfig(**base)  # type: ignore[arg-type]


def padded_and_packed(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask [B, T], and the same tokens packed end to end [N]."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(1, 97, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask  # pad id 0
    return ids, mask, ids[mask.bool()]


CASES = {
    "one length (one run, no mask)": [7, 7, 7, 7],
    "sorted (a few runs)": [9, 9, 8, 6, 6, 6, 3, 2],
    "unsorted, many lengths (padded attention)": [3, 11, 5, 2, 12, 7, 1, 9, 4, 10, 6],
    "single sequence": [13],
}


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "onednn-packed"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("lengths", list(CASES.values()), ids=list(CASES))
def test_packed_forward_matches_padded_forward(lengths: list[int], pooling: str, pack: bool) -> None:
    torch.manual_seed(0)
    model = Encoder(encoder_config(pooling=pooling)).eval()
    if pack:
        model.pack_weights()
    ids, mask, flat = padded_and_packed(lengths)
    varlen = VarLen(lengths)
    if len(set(lengths)) > 8:
        assert varlen.runs is None and varlen.index is not None
    else:
        assert varlen.runs is not None and varlen.index is None
    with torch.inference_mode():
        padded = model(ids, mask)
        packed = model.forward_packed(flat, varlen)
        assert packed.shape == (sum(lengths), 32)
        torch.testing.assert_close(packed, padded[mask.bool()], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.pool_packed(packed, varlen), model.pool(padded, mask), atol=1e-5, rtol=1e-5
        )


def test_both_attention_layouts_agree() -> None:
    """The per-run path and the scattered, masked path of the same batch give the same numbers."""
    torch.manual_seed(1)
    model = Encoder(encoder_config()).eval()
    lengths = [9, 9, 8, 6, 6, 6, 3, 2]
    _, _, flat = padded_and_packed(lengths, seed=3)
    runs, scattered = VarLen(lengths), VarLen(lengths, max_runs=1)
    assert runs.runs == [(0, 2, 9), (18, 1, 8), (26, 3, 6), (44, 1, 3), (47, 1, 2)]
    assert scattered.runs is None
    with torch.inference_mode():
        torch.testing.assert_close(
            model.forward_packed(flat, runs), model.forward_packed(flat, scattered), atol=1e-5, rtol=1e-5
        )


def test_varlen_bookkeeping() -> None:
    v = VarLen([3, 1, 2])
    assert (v.batch, v.width, v.tokens) == (3, 3, 6)
    assert v.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert v.segments.tolist() == [0, 0, 0, 1, 2, 2]
    assert v.starts.tolist() == [0, 3, 4]
    assert v.runs == [(0, 1, 3), (3, 1, 1), (4, 1, 2)]
    w = VarLen([3, 1, 2], max_runs=2)
    assert w.index is not None and w.index.tolist() == [0, 1, 2, 3, 6, 7]
    assert w.mask is not None and w.mask.shape == (3, 1, 1, 3)
    for bad in ([], [2, 0]):
        with pytest.raises(ValueError):
            VarLen(bad)


def test_packed_input_errors() -> None:
    model = Encoder(encoder_config()).eval()
    with pytest.raises(InputError):
        model.forward_packed(torch.ones(5, dtype=torch.long), VarLen([2, 2]))  # 5 ids, 4 expected
    with pytest.raises(InputError):
        model.forward_packed(torch.ones(2, 2, dtype=torch.long), VarLen([2, 2]))  # not packed
    with pytest.raises(InputError):
        model.forward_packed(torch.ones(60, dtype=torch.long), VarLen([60]))  # past max_positions


def test_packed_forward_trains_like_padded() -> None:
    """With autograd (plain weights, dropout off) the packed path gives the padded path's gradients."""
    torch.manual_seed(2)
    a = Encoder(encoder_config()).train()
    b = copy.deepcopy(a)
    lengths = [5, 5, 3, 8]
    ids, mask, flat = padded_and_packed(lengths, seed=5)
    varlen = VarLen(lengths)
    a.pool_packed(a.forward_packed(flat, varlen), varlen).square().sum().backward()
    b.pool(b(ids, mask), mask).square().sum().backward()
    ga, gb = a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad
    assert ga is not None and gb is not None
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
