"""`from_hf` and `load_hf_tokenizer`: layouts real checkpoints come in, and every way a directory can
be wrong, each of which must surface as one ModelLoadError that names the problem."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steward.model import Decoder, Encoder, from_hf
from steward.model.embedding import default_sentence_model_dir
from steward.model.hf import load_hf_tokenizer
from steward.model.io import ModelLoadError
from steward.model.tokenizer import train_bpe

transformers = pytest.importorskip("transformers")

VOCAB = 256


def _gpt2(directory: Path, **overrides: object) -> torch.nn.Module:
    """A tiny random GPT2LMHeadModel saved as safetensors into `directory`."""
    torch.manual_seed(0)
    kwargs: dict[str, object] = {
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "vocab_size": VOCAB,
        "n_positions": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "initializer_range": 0.2,
    }
    kwargs.update(overrides)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    hf.save_pretrained(directory, safe_serialization=True)
    return hf


def _logits_diff(hf: torch.nn.Module, model: Decoder | Encoder) -> float:
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        return float((model(ids) - hf(input_ids=ids).logits).abs().max())


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# --------------------------------------------------------------------------------------------------
# Layouts that must load


def test_tied_gpt2_is_tied_and_in_eval_mode(tmp_path: Path) -> None:
    hf = _gpt2(tmp_path)
    model = from_hf(tmp_path)
    assert isinstance(model, Decoder) and not model.training
    assert model.config.tie_embeddings
    assert model.lm_head.weight is model.embed.token.weight
    assert model.config.activation == "gelu_tanh" and model.config.d_ff == 4 * 32
    assert _logits_diff(hf, model) <= 1e-4


def test_untied_gpt2_head_loads_untied(tmp_path: Path) -> None:
    hf = _gpt2(tmp_path, tie_word_embeddings=False)
    model = from_hf(tmp_path)
    assert isinstance(model, Decoder)
    assert not model.config.tie_embeddings
    assert model.lm_head.weight is not model.embed.token.weight
    assert not torch.equal(model.lm_head.weight, model.embed.token.weight)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert _logits_diff(hf, model) <= 1e-4


def test_untied_gpt2_without_head_tensor_is_refused(tmp_path: Path) -> None:
    _gpt2(tmp_path, tie_word_embeddings=False)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensors: lm_head\.weight"):
        from_hf(tmp_path)


def test_special_ids_outside_vocabulary_warn_and_still_load(tmp_path: Path) -> None:
    hf = _gpt2(tmp_path, bos_token_id=50256, eos_token_id=50256)  # GPT-2's ids, vocab of 256
    with pytest.warns(UserWarning) as record:
        model = from_hf(tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    assert "bos_token_id=50256" in messages and "eos_token_id=50256" in messages
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
    assert _logits_diff(hf, model) <= 1e-4


def test_checkpoint_without_prefix_and_with_attention_buffers(tmp_path: Path) -> None:
    """The original gpt2 upload: GPT2Model names (no "transformer."), causal-mask buffers saved."""
    hf = _gpt2(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "model.safetensors").unlink()
    save_file(bare, str(tmp_path / "model.safetensors"))
    assert _logits_diff(hf, from_hf(tmp_path)) <= 1e-4


def test_sharded_safetensors(tmp_path: Path) -> None:
    hf = _gpt2(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    single, sharded = from_hf(tmp_path / "one"), from_hf(tmp_path / "sharded")
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dtype_argument(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    model = from_hf(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bert_with_prefix_and_pretraining_heads_matches_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_act="gelu",
    )
    hf = transformers.BertForMaskedLM(cfg).eval()  # "bert." prefix plus cls.* MLM head
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = from_hf(tmp_path)
    assert isinstance(model, Encoder) and not model.config.norm_first
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.inference_mode():
        expected = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4


def test_minilm_loads_as_encoder_ignoring_pooler_and_position_ids() -> None:
    model = from_hf(default_sentence_model_dir())
    assert isinstance(model, Encoder)
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (384, 6, 12, 1536)
    assert (cfg.norm_first, cfg.embedding_norm, cfg.final_norm) == (False, True, False)
    assert cfg.activation == "gelu" and cfg.norm_eps == 1e-12 and cfg.type_vocab_size == 2


def test_tensorflow_style_layernorm_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    transformers.BertModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    reference = from_hf(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    save_file(renamed, str(tmp_path / "model.safetensors"))
    legacy = from_hf(tmp_path)
    for (name, a), (_, b) in zip(reference.state_dict().items(), legacy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------
# Pickle checkpoints


def _pickle_only(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    hf = _gpt2(tmp_path / "src")
    directory = tmp_path / "pickled"
    directory.mkdir()
    shutil.copy(tmp_path / "src" / "config.json", directory)
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    return hf, directory


def test_pickle_checkpoint_is_refused_by_default(tmp_path: Path) -> None:
    _, directory = _pickle_only(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        from_hf(directory)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "pickle" in message
    assert "safetensors" in message and "allow_pickle=True" in message


def test_pickle_checkpoint_loads_when_allowed(tmp_path: Path) -> None:
    hf, directory = _pickle_only(tmp_path)
    assert _logits_diff(hf, from_hf(directory, allow_pickle=True)) <= 1e-4


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    _, directory = _pickle_only(tmp_path)
    torch.save({"weights": Path("not a tensor")}, directory / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        from_hf(directory, allow_pickle=True)


# --------------------------------------------------------------------------------------------------
# Broken directories


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        from_hf(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        from_hf(tmp_path)


def test_invalid_config_json(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        from_hf(tmp_path)


def test_missing_weights(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights found.*model\.safetensors"):
        from_hf(tmp_path)


def test_missing_shard(tmp_path: Path) -> None:
    _gpt2(tmp_path / "src").save_pretrained(tmp_path / "m", max_shard_size="20KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"missing: .*{victim.name}"):
        from_hf(tmp_path / "m")


def test_corrupt_safetensors(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match=r"cannot read .*model\.safetensors"):
        from_hf(tmp_path)


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    _edit_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ModelLoadError) as err:
        from_hf(tmp_path)
    message = str(err.value)
    assert "'llama'" in message and "LlamaForCausalLM" in message
    assert "gpt2" in message and "bert" in message


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"activation_function": "silu"}, r"activation_function='silu' is not supported"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_embd": None}, "'n_embd'"),
        ({"n_head": 5}, "divisible"),
    ],
)
def test_unsupported_gpt2_settings(tmp_path: Path, changes: dict[str, object], pattern: str) -> None:
    _gpt2(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ModelLoadError, match=pattern):
        from_hf(tmp_path)


def test_relative_position_bert_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "position_embedding_type": "relative_key"})
    )
    with pytest.raises(ModelLoadError, match="position_embedding_type='relative_key'"):
        from_hf(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 100)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        from_hf(tmp_path)
    message = str(err.value)
    assert "'transformer.h.1.mlp.c_fc.weight'" in message
    assert "[32, 100]" in message and "[32, 128]" in message


def test_config_that_disagrees_with_weights(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    _edit_config(tmp_path, n_layer=3)
    with pytest.raises(ModelLoadError, match=r"missing tensors: h\.2\.ln_1\.weight"):
        from_hf(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["transformer.h.0.attn.c_proj.bias"]
    state["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(4)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        from_hf(tmp_path)
    message = str(err.value)
    assert "missing tensors: h.0.attn.c_proj.bias" in message
    assert "unexpected tensors: transformer.h.0.attn.rotary.inv_freq" in message


def test_bert_missing_one_of_query_key_value(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    transformers.BertModel(cfg).save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["encoder.layer.0.attention.self.key.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    missing = r"missing tensors: encoder\.layer\.0\.attention\.self\.key\.weight\)"
    with pytest.raises(ModelLoadError, match=missing):
        from_hf(tmp_path)


# --------------------------------------------------------------------------------------------------
# Tokenizers


def test_missing_tokenizer_still_loads_weights(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    assert not any((tmp_path / n).exists() for n in ("tokenizer.json", "vocab.json", "vocab.txt"))
    assert isinstance(from_hf(tmp_path), Decoder)
    assert load_hf_tokenizer(tmp_path) is None


def test_gpt2_tokenizer_from_vocab_and_merges(tmp_path: Path) -> None:
    corpus = ["hello world, the quick brown fox", "tokenizers are byte level here"] * 20
    trained = train_bpe(corpus, vocab_size=300, min_frequency=1)
    trained.inner.model.save(str(tmp_path))  # writes vocab.json and merges.txt, GPT-2's files
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    loaded = load_hf_tokenizer(tmp_path)
    assert loaded is not None
    text = "hello the quick world<|endoftext|> naïve ☃"
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.eos_id == trained.token_to_id("<|endoftext|>")
    assert loaded.decode(loaded.encode("hello world"), skip_special_tokens=False) == "hello world"


def test_bert_tokenizer_from_vocab_txt_matches_tokenizer_json(tmp_path: Path) -> None:
    source = default_sentence_model_dir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, tmp_path)
    from_json, from_vocab = load_hf_tokenizer(source), load_hf_tokenizer(tmp_path)
    assert from_json is not None and from_vocab is not None
    texts = ["Héllo, WORLD!", "日本語とEnglish", "unaffable tokenization", "a\tb\nc", ""]
    for text in texts:
        a = from_json.inner.encode(text).ids
        assert a == from_vocab.inner.encode(text).ids, text
        assert a[0] == from_json.token_to_id("[CLS]") and a[-1] == from_json.token_to_id("[SEP]")


def test_saved_truncation_and_padding_are_switched_off() -> None:
    tok = load_hf_tokenizer(default_sentence_model_dir())  # its tokenizer.json pads/truncates at 128
    assert tok is not None
    assert len(tok.encode("word " * 300)) == 300
    assert len(tok.encode("word")) == 1


def test_no_unexpected_warnings_on_clean_checkpoint(tmp_path: Path) -> None:
    _gpt2(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hf(tmp_path)
