"""Model directories: round trip, sharding, manifest verification, clear load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steward.model import Decoder, Encoder, TransformerConfig
from steward.model.io import ModelLoadError, load_model, save_model, verify_manifest
from steward.model.tokenizer import train_bpe


def tiny_decoder() -> Decoder:
    cfg = TransformerConfig(vocab_size=300, max_positions=32, d_model=32, n_heads=4, n_layers=2, d_ff=64)
    return Decoder(cfg).eval()


def test_round_trip_fp32_is_exact(tmp_path: Path) -> None:
    m = tiny_decoder()
    tok = train_bpe(["some text to learn a vocabulary from, some more text"] * 5, 300, min_frequency=1)
    manifest = save_model(m, tmp_path, tok)
    assert manifest["parameters"] == m.num_parameters()
    loaded, tok2 = load_model(tmp_path)
    ids = torch.randint(0, 300, (2, 10))
    assert torch.equal(loaded(ids), m(ids))
    assert tok2 is not None and tok2.encode("some text") == tok.encode("some text")


def test_bf16_storage_and_sharding(tmp_path: Path) -> None:
    m = tiny_decoder()
    save_model(m, tmp_path, dtype=torch.bfloat16, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 40_000 for s in shards)
    loaded, tok = load_model(tmp_path)
    assert tok is None
    ids = torch.randint(0, 300, (1, 8))
    assert (loaded(ids) - m(ids)).abs().max() < 0.05  # bf16 rounding of the weights only


def test_encoder_round_trip(tmp_path: Path) -> None:
    cfg = TransformerConfig(
        arch="encoder",
        vocab_size=100,
        max_positions=16,
        d_model=16,
        n_heads=2,
        n_layers=1,
        d_ff=32,
        norm_first=False,
        embedding_norm=True,
        final_norm=False,
        num_labels=2,
    )
    e = Encoder(cfg).eval()
    save_model(e, tmp_path)
    loaded, _ = load_model(tmp_path)
    ids = torch.randint(0, 100, (2, 6))
    assert isinstance(loaded, Encoder) and torch.equal(loaded.classify(ids), e.classify(ids))


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    save_model(tiny_decoder(), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"SHA-256 of model\.safetensors does not match"):
        load_model(tmp_path)
    load_model(tmp_path, verify=False)  # an explicit opt-out still loads


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"steward_config\.json"):
        load_model(tmp_path)
    save_model(tiny_decoder(), tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no manifest\.json"):
        verify_manifest(tmp_path)
    # a config that disagrees with the weights: a shape mismatch named as such
    save_model(tiny_decoder(), tmp_path)
    cfg = json.loads((tmp_path / "steward_config.json").read_text())
    cfg["d_ff"] = 128
    (tmp_path / "steward_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="shape mismatch"):
        load_model(tmp_path, verify=False)
