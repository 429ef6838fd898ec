"""Import local Hugging Face checkpoints (GPT-2, BERT/MiniLM) into Steward's own modules.

Steward runs its own Transformer rather than `transformers`, so that every layer it serves is code
the project has read and tested; importing a published checkpoint is therefore a renaming of tensors
plus a translation of `config.json` into a `TransformerConfig`. The import works from a local
directory only (nothing is fetched), reads safetensors by default and refuses pickle files unless
asked, because unpickling a file can run arbitrary code while safetensors is plain data.

Every failure is a `ModelLoadError` that names the directory and the offending key, tensor or value:
a model directory is usually hand-assembled by an operator, and "KeyError: 'n_embd'" does not tell
them what to fix.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from .config import Activation, ConfigError, TransformerConfig
from .io import ModelLoadError
from .tokenizer import EOS, Tokenizer
from .transformer import Decoder, Encoder, build_model

__all__ = ["SUPPORTED_MODEL_TYPES", "from_hf", "load_hf_tokenizer"]

_MISSING: Any = object()


@dataclass(frozen=True)
class _Rule:
    """One tensor of a checkpoint and where it goes; `{i}` stands for the layer index.

    `transpose` is for GPT-2's Conv1D, which stores its weight as [in, out] where nn.Linear keeps
    [out, in]. `part` places BERT's separate query/key/value tensors into Steward's fused QKV
    projection (rows 0..d-1 are Q, then K, then V, which is also GPT-2's c_attn layout).
    """

    hf: str
    steward: str
    transpose: bool = False
    part: int | None = None


@dataclass(frozen=True)
class _Arch:
    rules: tuple[_Rule, ...]
    prefixes: tuple[str, ...]  # wrappers such as GPT2LMHeadModel put the body under "transformer."
    ignored: re.Pattern[str]  # buffers and heads that carry nothing Steward's module uses
    make_config: Callable[[dict[str, Any], Path], TransformerConfig]
    rename: Callable[[str], str] | None = None  # legacy spellings -> the names the rules use


def _gpt2_rules() -> tuple[_Rule, ...]:
    rules = [
        _Rule("wte.weight", "embed.token.weight"),
        _Rule("wpe.weight", "embed.position.weight"),
        _Rule("ln_f.weight", "norm.weight"),
        _Rule("ln_f.bias", "norm.bias"),
        _Rule("lm_head.weight", "lm_head.weight"),
    ]
    per_layer = [
        ("ln_1", "attn_norm", False),
        ("attn.c_attn", "attn.qkv", True),
        ("attn.c_proj", "attn.out", True),
        ("ln_2", "ffn_norm", False),
        ("mlp.c_fc", "ffn.up", True),
        ("mlp.c_proj", "ffn.down", True),
    ]
    for hf, st, conv1d in per_layer:
        rules.append(_Rule(f"h.{{i}}.{hf}.weight", f"blocks.{{i}}.{st}.weight", transpose=conv1d))
        rules.append(_Rule(f"h.{{i}}.{hf}.bias", f"blocks.{{i}}.{st}.bias"))
    return tuple(rules)


def _bert_rules() -> tuple[_Rule, ...]:
    rules = [
        _Rule("embeddings.word_embeddings.weight", "embed.token.weight"),
        _Rule("embeddings.position_embeddings.weight", "embed.position.weight"),
        _Rule("embeddings.token_type_embeddings.weight", "embed.token_type.weight"),
    ]
    layer = "encoder.layer.{i}"
    for p in ("weight", "bias"):
        rules.append(_Rule(f"embeddings.LayerNorm.{p}", f"embed.norm.{p}"))
        for part, name in enumerate(("query", "key", "value")):
            rules.append(_Rule(f"{layer}.attention.self.{name}.{p}", f"blocks.{{i}}.attn.qkv.{p}", part=part))
        rules += [
            _Rule(f"{layer}.attention.output.dense.{p}", f"blocks.{{i}}.attn.out.{p}"),
            _Rule(f"{layer}.attention.output.LayerNorm.{p}", f"blocks.{{i}}.attn_norm.{p}"),
            _Rule(f"{layer}.intermediate.dense.{p}", f"blocks.{{i}}.ffn.up.{p}"),
            _Rule(f"{layer}.output.dense.{p}", f"blocks.{{i}}.ffn.down.{p}"),
            _Rule(f"{layer}.output.LayerNorm.{p}", f"blocks.{{i}}.ffn_norm.{p}"),
        ]
    return tuple(rules)


def _bert_rename(name: str) -> str:
    # Checkpoints converted from TensorFlow BERT name LayerNorm's parameters gamma/beta.
    if name.endswith("LayerNorm.gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith("LayerNorm.beta"):
        return name[: -len("beta")] + "bias"
    return name


# --------------------------------------------------------------------------------------------------
# config.json -> TransformerConfig


def _get(hf: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = hf.get(key, default)
    if value is _MISSING:
        raise ModelLoadError(f"config.json has no {key!r}")
    if value is default:
        return value
    # bool is an int subclass: `"n_layer": true` must not pass as 1 layer.
    wrong_bool = isinstance(value, bool) and kind is not bool
    if wrong_bool or not isinstance(value, kind):
        raise ModelLoadError(f"config.json: {key!r} has unexpected value {value!r}")
    return value


def _activation(hf: Mapping[str, Any], key: str, default: str) -> Activation:
    name = hf.get(key, default)
    table: dict[str, Activation] = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    table |= {"gelu": "gelu", "relu": "relu"}
    if name not in table:
        raise ModelLoadError(
            f"config.json: {key}={name!r} is not supported (supported: {', '.join(sorted(table))})"
        )
    return table[name]


def _special_id(hf: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    """A special-token id from the config, or None (and a warning) if it is not in the vocabulary.

    Real configs carry such ids (GPT-2 variants with a shrunken vocabulary keep eos=50256); the
    weights are still usable, only generation must not be told to stop on a token the model cannot
    emit.
    """
    value = hf.get(key)
    if isinstance(value, list):  # several stop ids: the first is the canonical one
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        warnings.warn(
            f"config.json: {key}={value!r} is outside the vocabulary (size {vocab_size}); "
            f"ignoring it ({key} set to None)",
            stacklevel=4,
        )
        return None
    return value


def _refuse(hf: Mapping[str, Any], key: str, unsupported: Any, why: str) -> None:
    if hf.get(key, None) == unsupported:
        raise ModelLoadError(f"config.json: {key}={unsupported!r} is not supported ({why})")


def _gpt2_config(hf: dict[str, Any], directory: Path) -> TransformerConfig:
    _refuse(hf, "scale_attn_weights", False, "Steward always scales attention by 1/sqrt(d_head)")
    _refuse(hf, "scale_attn_by_inverse_layer_idx", True, "Steward does not scale by layer index")
    _refuse(hf, "add_cross_attention", True, "Steward's decoder has no cross-attention")
    d_model = _get(hf, "n_embd", int)
    vocab = _get(hf, "vocab_size", int)
    n_inner = _get(hf, "n_inner", int, None)
    return TransformerConfig(
        arch="decoder",
        vocab_size=vocab,
        max_positions=_get(hf, "n_positions", int),
        d_model=d_model,
        n_heads=_get(hf, "n_head", int),
        n_layers=_get(hf, "n_layer", int),
        d_ff=n_inner if n_inner is not None else 4 * d_model,
        activation=_activation(hf, "activation_function", "gelu_new"),
        norm_eps=float(_get(hf, "layer_norm_epsilon", (int, float), 1e-5)),
        norm_first=True,
        embedding_norm=False,
        final_norm=True,
        type_vocab_size=0,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", bool, True)),
        bos_token_id=_special_id(hf, "bos_token_id", vocab),
        eos_token_id=_special_id(hf, "eos_token_id", vocab),
        pad_token_id=_special_id(hf, "pad_token_id", vocab),
        name=directory.resolve().name,
        extra={"source": "huggingface", "hf_model_type": "gpt2"},
    )


def _bert_config(hf: dict[str, Any], directory: Path) -> TransformerConfig:
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ModelLoadError(
            f"config.json: position_embedding_type={kind!r} is not supported "
            "(Steward's encoder has learned absolute positions only)"
        )
    _refuse(hf, "is_decoder", True, "a causal BERT is not an encoder; Steward imports BERT as one")
    _refuse(hf, "add_cross_attention", True, "Steward's encoder has no cross-attention")
    vocab = _get(hf, "vocab_size", int)
    return TransformerConfig(
        arch="encoder",
        vocab_size=vocab,
        max_positions=_get(hf, "max_position_embeddings", int),
        d_model=_get(hf, "hidden_size", int),
        n_heads=_get(hf, "num_attention_heads", int),
        n_layers=_get(hf, "num_hidden_layers", int),
        d_ff=_get(hf, "intermediate_size", int),
        activation=_activation(hf, "hidden_act", "gelu"),
        norm_eps=float(_get(hf, "layer_norm_eps", (int, float), 1e-12)),
        norm_first=False,
        embedding_norm=True,
        final_norm=False,
        type_vocab_size=_get(hf, "type_vocab_size", int, 2),
        tie_embeddings=False,
        pooling="mean",
        bos_token_id=_special_id(hf, "bos_token_id", vocab),
        eos_token_id=_special_id(hf, "eos_token_id", vocab),
        pad_token_id=_special_id(hf, "pad_token_id", vocab),
        name=directory.resolve().name,
        extra={"source": "huggingface", "hf_model_type": "bert"},
    )


_ARCHS: dict[str, _Arch] = {
    "gpt2": _Arch(
        rules=_gpt2_rules(),
        prefixes=("transformer.",),
        ignored=re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
        make_config=_gpt2_config,
    ),
    "bert": _Arch(
        rules=_bert_rules(),
        prefixes=("bert.",),
        # position_ids is a saved arange buffer; pooler and cls.* are the NSP/MLM training heads.
        ignored=re.compile(r"embeddings\.position_ids|pooler\..*|cls\..*"),
        make_config=_bert_config,
        rename=_bert_rename,
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHS)


# --------------------------------------------------------------------------------------------------
# Reading files


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        if (directory / "steward_config.json").is_file():
            raise ModelLoadError(
                f"{directory}: no config.json; this is a Steward model directory, load it with "
                "steward.model.io.load_model"
            )
        raise ModelLoadError(f"{directory}: no config.json (not a Hugging Face model directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            shard = load_file(str(f))
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise ModelLoadError(f"cannot read {f}: {exc}") from exc
        for name, tensor in shard.items():
            if name in state:
                raise ModelLoadError(f"tensor {name!r} appears in more than one shard ({f.name})")
            state[name] = tensor
    return state


def _read_pickles(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ... by kind of damage
            raise ModelLoadError(f"cannot read {f} with torch.load(weights_only=True): {exc}") from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]  # training checkpoints wrap the weights
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise ModelLoadError(f"{f} does not hold a state dict (a mapping of names to tensors)")
        state.update(obj)
    return state


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{index} is not a valid shard index: {exc!r}") from exc
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index.parent}: shards listed in {index.name} are missing: {missing}")
    return files


def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    single = directory / "model.safetensors"
    if single.is_file():
        return _read_safetensors([single])
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return _read_safetensors(_shards_from_index(index))
    pickle_index = directory / "pytorch_model.bin.index.json"
    pickles = (
        _shards_from_index(pickle_index)
        if pickle_index.is_file()
        else sorted({p for pat in _PICKLE_PATTERNS for p in directory.glob(pat) if p.is_file()})
    )
    if not pickles:
        raise ModelLoadError(
            f"{directory}: no weights found (expected model.safetensors or a sharded "
            "model.safetensors.index.json)"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"{directory}: only pickle checkpoints found ({', '.join(p.name for p in pickles)}); "
            "refusing to load them because unpickling can execute arbitrary code. Convert the "
            "weights to safetensors (model.safetensors), or pass allow_pickle=True if you trust "
            "the files (they are then read with torch.load(weights_only=True))."
        )
    return _read_pickles(pickles)


# --------------------------------------------------------------------------------------------------
# Mapping tensors


_LAYER = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    """'h.3.ln_1.weight' -> ('h.{i}.ln_1.weight', 3): a dict lookup instead of a regex per rule."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return f"{name[: m.start()]}.{{i}}.{name[m.end() :]}", int(m.group(1))


def _expected_source_shape(rule: _Rule, target: tuple[int, ...]) -> tuple[int, ...]:
    shape = list(target)
    if rule.part is not None:
        shape[0] //= 3
    if rule.transpose:
        shape.reverse()
    return tuple(shape)


def _shape_str(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _summarise(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _map_state(
    arch: _Arch,
    model_type: str,
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    directory: Path,
) -> dict[str, torch.Tensor]:
    by_hf = {r.hf: r for r in arch.rules}
    mapped: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    source_of: dict[tuple[str, int | None], str] = {}
    unexpected: list[str] = []
    ignored_heads: list[str] = []
    for full_name, tensor in state.items():
        name = full_name
        for prefix in arch.prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if arch.rename is not None:
            name = arch.rename(name)
        if arch.ignored.fullmatch(name):
            continue
        template, layer = _template(name)
        rule = by_hf.get(template)
        target = rule.steward.format(i=layer) if rule is not None else None
        if rule is None or target not in expected:
            if name.startswith("classifier."):
                ignored_heads.append(full_name)
            else:
                unexpected.append(full_name)
            continue
        assert target is not None
        want = _expected_source_shape(rule, expected[target])
        if tuple(tensor.shape) != want:
            raise ModelLoadError(
                f"{directory}: tensor {full_name!r} has shape {_shape_str(tensor.shape)}, but the "
                f"{model_type} config implies {_shape_str(want)}"
            )
        key = (target, rule.part)
        if key in source_of:
            raise ModelLoadError(
                f"{directory}: tensors {source_of[key]!r} and {full_name!r} both map to {target!r}"
            )
        source_of[key] = full_name
        value = tensor.t() if rule.transpose else tensor
        if rule.part is None:
            mapped[target] = value
        else:
            parts.setdefault(target, {})[rule.part] = value

    missing: list[str] = []
    for target, pieces in parts.items():
        if len(pieces) == 3:
            mapped[target] = torch.cat([pieces[0], pieces[1], pieces[2]], dim=0)
    for target in expected:
        if target in mapped:
            continue
        template, layer = _template(target)
        got = parts.get(target, {})
        missing += [
            r.hf.format(i=layer)
            for r in arch.rules
            if r.steward == template and (r.part is None or r.part not in got)
        ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing tensors: {_summarise(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {_summarise(unexpected)}")
        raise ModelLoadError(
            f"{directory}: checkpoint does not match its {model_type} config.json ("
            + "; ".join(problems)
            + ")"
        )
    if ignored_heads:
        warnings.warn(
            f"{directory}: classification head tensors ({_summarise(ignored_heads, 4)}) are not "
            "imported; Steward's encoder pools differently, so the head would not apply",
            stacklevel=3,
        )
    return mapped


# --------------------------------------------------------------------------------------------------
# Public API


def from_hf(
    path: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype = torch.float32
) -> Decoder | Encoder:
    """Build a Steward Decoder (GPT-2) or Encoder (BERT, MiniLM) from a local HF model directory.

    The module is created on the meta device and the checkpoint's tensors are assigned into it, so a
    large model is not first filled with random weights that are immediately thrown away.
    """
    directory = Path(path)
    if not directory.exists():
        raise ModelLoadError(f"model directory not found: {directory}")
    if not directory.is_dir():
        raise ModelLoadError(f"{directory} is not a directory (from_hf expects a model directory)")
    hf_config = _read_config(directory)
    model_type = hf_config.get("model_type")
    arch = _ARCHS.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        declared = hf_config.get("architectures")
        raise ModelLoadError(
            f"{directory}: unsupported architecture model_type={model_type!r}"
            + (f" ({', '.join(map(str, declared))})" if isinstance(declared, list) else "")
            + f"; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} (BERT covers MiniLM)"
        )
    assert isinstance(model_type, str)
    try:
        cfg = arch.make_config(hf_config, directory)
    except ConfigError as exc:
        raise ModelLoadError(f"{directory}/config.json describes an invalid model: {exc}") from exc
    state = _read_weights(directory, allow_pickle)

    with torch.device("meta"):
        model = build_model(cfg)
    tied = isinstance(model, Decoder) and cfg.tie_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        # The head shares embed.token.weight; a copy saved anyway is ignored, as transformers does.
        del expected["lm_head.weight"]
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    mapped = _map_state(arch, model_type, state, expected, directory)
    mapped = {k: v.to(dtype).contiguous() for k, v in mapped.items()}
    if tied:
        mapped["lm_head.weight"] = mapped["embed.token.weight"]
    model.load_state_dict(mapped, strict=True, assign=True)
    if isinstance(model, Decoder) and tied:
        # assign=True gives each module its own Parameter object; re-share so the tie is real again.
        model.lm_head.weight = model.embed.token.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelLoadError(f"{directory}: no weights for {_summarise(leftover)}")
    return model.eval()


def _json_or_empty(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # tokenizer_config.json may store AddedToken objects
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a HF model directory, or None when it has no tokenizer files.

    Kept apart from `from_hf` because weights are useful without a tokenizer (the caller may bring
    its own ids) and a missing tokenizer should not block loading them. Truncation and padding saved
    in tokenizer.json are switched off: they are properties of one training setup, and callers
    truncate to the limits they know (MiniLM's tokenizer.json would pad every input to 128 tokens).
    """
    directory = Path(path)
    tok_cfg = _json_or_empty(directory / "tokenizer_config.json")
    special_map = _json_or_empty(directory / "special_tokens_map.json")
    tokenizer_json = directory / "tokenizer.json"
    vocab_json, merges = directory / "vocab.json", directory / "merges.txt"
    vocab_txt = directory / "vocab.txt"
    try:
        if tokenizer_json.is_file():
            inner = HFTokenizer.from_file(str(tokenizer_json))
        elif vocab_json.is_file() and merges.is_file():
            inner = _byte_level_bpe(vocab_json, merges)
        elif vocab_txt.is_file():
            inner = _wordpiece(vocab_txt, tok_cfg, special_map)
        else:
            return None
    except ModelLoadError:
        raise
    except Exception as exc:  # the Rust side raises bare Exceptions for malformed files
        raise ModelLoadError(f"{directory}: cannot read the tokenizer: {exc}") from exc
    inner.no_truncation()
    inner.no_padding()
    eos = _token_str(tok_cfg.get("eos_token")) or _token_str(special_map.get("eos_token")) or EOS
    return Tokenizer(inner, eos_token=eos)


def _byte_level_bpe(vocab: Path, merges: Path) -> HFTokenizer:
    """GPT-2's tokenizer from its two original files: byte-level pre-tokenisation, then BPE."""
    inner = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.post_processor = processors.ByteLevel(trim_offsets=False)
    if inner.token_to_id(EOS) is not None:
        inner.add_special_tokens([EOS])  # otherwise "<|endoftext|>" in text would be split up
    return inner


def _wordpiece(vocab: Path, tok_cfg: Mapping[str, Any], special_map: Mapping[str, Any]) -> HFTokenizer:
    """BERT's tokenizer from vocab.txt, honouring the casing/accent options of tokenizer_config."""

    def special(key: str, default: str) -> str:
        return _token_str(tok_cfg.get(key)) or _token_str(special_map.get(key)) or default

    unk = special("unk_token", "[UNK]")
    cls = special("cls_token", "[CLS]")
    sep = special("sep_token", "[SEP]")
    specials = [unk, cls, sep, special("pad_token", "[PAD]"), special("mask_token", "[MASK]")]
    inner = HFTokenizer(models.WordPiece.from_file(str(vocab), unk_token=unk))
    strip_accents = tok_cfg.get("strip_accents")
    inner.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(tok_cfg.get("tokenize_chinese_chars", True)),
        strip_accents=strip_accents if isinstance(strip_accents, bool) else None,
        lowercase=bool(tok_cfg.get("do_lower_case", True)),
    )
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    inner.decoder = decoders.WordPiece(prefix="##")
    inner.add_special_tokens([t for t in specials if inner.token_to_id(t) is not None])
    cls_id, sep_id = inner.token_to_id(cls), inner.token_to_id(sep)
    if cls_id is not None and sep_id is not None:
        inner.post_processor = processors.BertProcessing((sep, sep_id), (cls, cls_id))
    return inner
