"""Generation: cache/batch/seed invariances, samplers, stops, limits, logprobs, streaming, errors."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steward.model import Decoder, TransformerConfig
from steward.model.generate import (
    GenerationConfig,
    GenerationError,
    generate,
    stop_token_ids,
    stream,
)
from steward.model.kv_cache import KVCache
from steward.model.tokenizer import EOS, Tokenizer, train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there. Café crème brûlée, naïve résumé.",
    "東京 and 大阪 are cities; 🙂 is a smile and 🎉 a party.",
] * 20


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's spinning threads turn
    a 0.5 ms forward into 50 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, 320, min_frequency=2)


def sharp_decoder(vocab: int, ctx: int = 64, seed: int = 0) -> Decoder:
    """A random decoder with peaked next-token distributions.

    GPT-2's init (std 0.02) makes a tiny model's logits nearly uniform, where greedy decoding is
    decided by rounding noise and sampling ignores the model; larger weights give real preferences.
    """
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=vocab, max_positions=ctx, d_model=32, n_heads=4, n_layers=2, d_ff=64)
    m = Decoder(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.6 if name == "embed.token.weight" else 0.15)
    return m


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> Decoder:
    return sharp_decoder(tok.vocab_size)


class Scripted(Decoder):
    """A decoder whose every step puts all probability on the next token of a fixed script.

    Runs the real network (so the cache is exercised) and then overrides the logits: stop sequences,
    UTF-8 splits and EOS handling can then be tested on known token sequences.
    """

    def __init__(self, cfg: TransformerConfig, script: Sequence[int]) -> None:
        super().__init__(cfg)
        self.script = list(script)
        self.step = 0

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        out = super().forward(input_ids, attention_mask, position_ids, cache, last_only)
        if input_ids.shape[1] > 1:
            self.step = 0
        logits = torch.full_like(out, -30.0)
        logits[..., self.script[min(self.step, len(self.script) - 1)]] = 30.0
        self.step += 1
        return logits


def scripted(tok: Tokenizer, text: str, *, then_eos: bool = False) -> Scripted:
    ids = tok.encode(text)
    if then_eos:
        assert tok.eos_id is not None
        ids.append(tok.eos_id)
    cfg = TransformerConfig(
        vocab_size=tok.vocab_size, max_positions=128, d_model=16, n_heads=2, n_layers=1, d_ff=32
    )
    return Scripted(cfg, ids).eval()


def greedy_reference(model: Decoder, prompt: list[int], n: int, stops: frozenset[int]) -> list[int]:
    """Greedy decoding by full recomputation, no cache: the ground truth for the cached path."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


PROMPTS = ["The quick brown", "Hello", "東京 and 大阪 are cities; 🙂 is"]


def test_cached_greedy_equals_uncached_recomputation(model: Decoder, tok: Tokenizer) -> None:
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    for prompt in PROMPTS:
        done = generate(model, tok, [prompt], cfg)[0]
        ref = greedy_reference(model, tok.encode(prompt), 16, stop_token_ids(tok))
        assert done.token_ids == ref
        assert done.finish_reason == ("length" if len(ref) == 16 else "stop")


@pytest.mark.parametrize(
    "cfg",
    [
        GenerationConfig(max_new_tokens=12, temperature=0),
        GenerationConfig(max_new_tokens=12, temperature=0.8, seed=11),
        GenerationConfig(max_new_tokens=12, temperature=1.3, top_k=5, top_p=0.9, seed=5),
        GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=6),
    ],
    ids=["greedy", "sampled", "topk-topp", "topp"],
)
def test_batch_with_left_padding_equals_one_by_one(
    model: Decoder, tok: Tokenizer, cfg: GenerationConfig
) -> None:
    batched = generate(model, tok, PROMPTS, cfg)
    assert len({len(tok.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # really padded
    for prompt, b in zip(PROMPTS, batched, strict=True):
        alone = generate(model, tok, [prompt], cfg)[0]
        assert (b.token_ids, b.text, b.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
        assert b.prompt_tokens == len(tok.encode(prompt))


def test_early_finishers_do_not_disturb_other_rows(tok: Tokenizer) -> None:
    """Rows leaving the batch (stop, EOS) must not shift the random streams of those that remain."""
    m = sharp_decoder(tok.vocab_size, seed=3)
    prompts = ["The quick brown", "Hello", "東京", "lazy dog", "Café"]
    seeds = [4, 5, 6, 7, 8]  # one stream per row, so a row handed another's stream would show
    cfg = GenerationConfig(max_new_tokens=24, temperature=2.0)  # hot: every draw matters
    free = generate(m, tok, prompts, cfg, seeds=seeds)
    # Stop strings taken from two rows' own continuations make those rows leave the batch early.
    usable = [[ch for ch in c.text[2:] if ch.isprintable() and ch != "\ufffd"] for c in free]
    cfg.stop = [chars[0] for chars in usable if chars][:2]
    batched = generate(m, tok, prompts, cfg, seeds=seeds)
    assert len({c.completion_tokens for c in batched}) > 2  # rows really finished at different steps
    for prompt, seed, b in zip(prompts, seeds, batched, strict=True):
        assert b.token_ids == generate(m, tok, [prompt], cfg, seeds=[seed])[0].token_ids


def test_seed_reproducible_and_seeds_differ(model: Decoder, tok: Tokenizer) -> None:
    def run(seed: int) -> list[int]:
        cfg = GenerationConfig(max_new_tokens=24, temperature=1.5, seed=seed)
        return generate(model, tok, ["Hello world"], cfg)[0].token_ids

    assert run(7) == run(7)
    assert len({tuple(run(s)) for s in (1, 2, 3)}) > 1


def test_longer_request_continues_the_shorter_one(model: Decoder, tok: Tokenizer) -> None:
    """The n-th token uses the n-th random number of the row's stream, whatever max_new_tokens is."""
    short = generate(model, tok, ["Hello"], GenerationConfig(max_new_tokens=5, seed=8, temperature=1.5))[0]
    long = generate(model, tok, ["Hello"], GenerationConfig(max_new_tokens=150, seed=8, temperature=1.5))[0]
    assert long.token_ids[: len(short.token_ids)] == short.token_ids


def test_top_k_one_and_tiny_top_p_equal_greedy(model: Decoder, tok: Tokenizer) -> None:
    greedy = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0))
    top1 = generate(
        model, tok, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=2.0, top_k=1, seed=1)
    )
    nucleus = generate(
        model, tok, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=2)
    )
    for g, a, b in zip(greedy, top1, nucleus, strict=True):
        assert g.token_ids == a.token_ids == b.token_ids


def test_sampled_frequencies_respect_top_k_and_the_distribution(model: Decoder, tok: Tokenizer) -> None:
    prompt = tok.encode("The quick")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
    top = torch.topk(probs, 3)
    allowed = top.indices.tolist()
    n = 600
    cfg = GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=3)
    outs = generate(model, tok, [prompt] * n, cfg, seeds=list(range(n)))
    firsts = Counter(c.token_ids[0] if c.token_ids else -1 for c in outs)
    stops = stop_token_ids(tok)
    assert set(firsts) <= set(allowed) | ({-1} if stops & set(allowed) else set())
    expected = (top.values / top.values.sum()).tolist()
    for idx, p in zip(allowed, expected, strict=True):
        key = -1 if idx in stops else idx
        assert abs(firsts[key] / n - p) < 0.07, (firsts, expected)


def test_top_p_keeps_exactly_the_nucleus(tok: Tokenizer) -> None:
    """Flat logits put the nucleus beyond the fast top-256 search: the full-sort path must agree."""
    m = sharp_decoder(tok.vocab_size, seed=2)
    with torch.no_grad():
        m.embed.token.weight.mul_(0.05)  # nearly uniform next-token distribution
        probs = torch.softmax(m(torch.tensor([tok.encode("Hello")]))[0, -1], dim=-1).double()
    top_p = 0.9
    order = torch.sort(probs, descending=True)
    before = order.values.cumsum(0) - order.values
    nucleus = set(order.indices[before < top_p].tolist())
    assert len(nucleus) > 256
    n = 400
    outs = generate(m, tok, ["Hello"] * n, GenerationConfig(max_new_tokens=1, top_p=top_p), seeds=range(n))
    drawn = {c.token_ids[0] for c in outs if c.token_ids}
    assert drawn <= nucleus
    assert drawn - set(order.indices[:256].tolist())  # the tail of the nucleus is reachable too


def test_stop_sequence_spanning_tokens_cuts_text(tok: Tokenizer) -> None:
    text = "Hello world, hello there. Café crème"
    m = scripted(tok, text)
    stop = "d, he"
    ids = tok.encode(text)
    # The stop text must really span a token boundary for this test to mean anything.
    assert not any(stop in tok.decode([t]) for t in ids)
    done = generate(
        m, tok, ["The quick"], GenerationConfig(max_new_tokens=40, temperature=0, stop=[stop, "zzz"])
    )[0]
    assert done.text == "Hello worl"
    assert done.finish_reason == "stop"
    assert done.completion_tokens == len(done.token_ids) < len(ids)
    deltas = list(
        stream(m, tok, "The quick", GenerationConfig(max_new_tokens=40, temperature=0, stop=[stop]))
    )
    assert "".join(d.text for d in deltas) == "Hello worl"
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == done.token_ids


def test_eos_stops_and_is_not_part_of_the_output(tok: Tokenizer) -> None:
    m = scripted(tok, "Hello world", then_eos=True)
    done = generate(m, tok, ["The quick"], GenerationConfig(max_new_tokens=40, temperature=0))[0]
    assert done.text == "Hello world"
    assert done.finish_reason == "stop"
    assert tok.token_to_id(EOS) not in done.token_ids
    assert done.completion_tokens == len(done.token_ids) + 1


def test_max_tokens_and_context_limit(tok: Tokenizer) -> None:
    m = scripted(tok, "Hello world, hello there. " * 10)
    done = generate(m, tok, ["The quick"], GenerationConfig(max_new_tokens=5, temperature=0))[0]
    assert (done.finish_reason, done.completion_tokens, len(done.token_ids)) == ("length", 5, 5)

    ctx = m.config.max_positions
    long_prompt = list(range(10, 10 + ctx - 3))
    short_prompt = [10, 11, 12]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)
    long_done, short_done = generate(m, tok, [long_prompt, short_prompt], cfg)
    assert (long_done.finish_reason, long_done.completion_tokens) == ("length", 3)
    # The short row continues after the long one hits the context (its padding is squeezed out).
    assert (short_done.finish_reason, short_done.completion_tokens) == ("length", 10)


def test_context_limit_in_a_batch_matches_alone(tok: Tokenizer) -> None:
    m = sharp_decoder(tok.vocab_size, ctx=24, seed=1)
    prompts = [list(range(40, 60)), list(range(40, 44)), list(range(50, 58))]
    cfg = GenerationConfig(max_new_tokens=15, temperature=0.9, seed=3)
    batched = generate(m, tok, prompts, cfg)
    assert batched[0].completion_tokens <= 4
    for p, b in zip(prompts, batched, strict=True):
        alone = generate(m, tok, [p], cfg)[0]
        assert (b.token_ids, b.finish_reason) == (alone.token_ids, alone.finish_reason)
        assert len(p) + b.completion_tokens <= 24


def test_prompt_too_long_names_the_lengths(model: Decoder, tok: Tokenizer) -> None:
    ctx = model.config.max_positions
    with pytest.raises(GenerationError, match=rf"prompt 1 is {ctx} tokens.*context is {ctx}"):
        generate(model, tok, [[5, 6], [7] * ctx], GenerationConfig())
    with pytest.raises(GenerationError, match="prompt is empty"):
        generate(model, tok, [""], GenerationConfig())
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        generate(model, tok, [[5, 10_000]], GenerationConfig())


def test_logprobs_match_full_forward(model: Decoder, tok: Tokenizer) -> None:
    cfg = GenerationConfig(max_new_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    prompts = ["The quick brown", "Hello"]
    for prompt, done in zip(prompts, generate(model, tok, prompts, cfg), strict=True):
        assert done.logprobs is not None and len(done.logprobs) == len(done.token_ids)
        ids = tok.encode(prompt) + done.token_ids
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
        start = len(tok.encode(prompt)) - 1
        for i, (t, info) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
            row = lp[start + i]
            assert info.id == t and info.token == tok.decode([t], skip_special_tokens=False)
            assert info.logprob == pytest.approx(float(row[t]), abs=1e-4)
            values = [a.logprob for a in info.top_logprobs]
            assert len(values) == 5 and values == sorted(values, reverse=True)
            assert info.top_logprobs[0].id == t  # greedy: the chosen token is the argmax
            for a in info.top_logprobs:
                assert a.logprob == pytest.approx(float(row[a.id]), abs=1e-4)


def test_sampled_logprobs_are_the_raw_model_distribution(model: Decoder, tok: Tokenizer) -> None:
    """Reported logprobs ignore temperature and top-k: they describe the model, not the sampler."""
    cfg = GenerationConfig(max_new_tokens=1, temperature=2.5, top_k=4, seed=1, logprobs=True)
    done = generate(model, tok, ["Hello"], cfg)[0]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([tok.encode("Hello")]))[0, -1], dim=-1)
    assert done.logprobs is not None
    assert done.logprobs[0].logprob == pytest.approx(float(lp[done.logprobs[0].id]), abs=1e-4)


def test_stream_concatenates_to_generate(model: Decoder, tok: Tokenizer) -> None:
    for prompt in PROMPTS:
        cfg = GenerationConfig(max_new_tokens=20, temperature=1.2, seed=9, logprobs=True)
        done = generate(model, tok, [prompt], cfg)[0]
        deltas = list(stream(model, tok, prompt, cfg))
        assert "".join(d.text for d in deltas) == done.text
        assert [t for d in deltas for t in d.token_ids] == done.token_ids
        assert [lp for d in deltas for lp in d.logprobs or []] == done.logprobs
        assert deltas[-1].finish_reason == done.finish_reason
        assert deltas[-1].completion_tokens == done.completion_tokens
        assert done.text == tok.decode(done.token_ids)  # incremental == one-shot detokenisation


def test_stream_never_splits_a_utf8_character(tok: Tokenizer) -> None:
    text = "東京 🙂🎉 crème"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some character spans several tokens
    m = scripted(tok, text, then_eos=True)
    deltas = list(stream(m, tok, "東京", GenerationConfig(max_new_tokens=40, temperature=0)))
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert len(deltas) > 3  # really streamed, not one final blob
    done = generate(m, tok, ["東京"], GenerationConfig(max_new_tokens=40, temperature=0))[0]
    assert done.text == text


def test_incremental_text_equals_one_shot_decode_on_random_tokens(tok: Tokenizer) -> None:
    """Random byte-level tokens are mostly broken UTF-8: the streamed text must still equal a decode
    of all tokens at once, and must flow before the end rather than wait for valid characters."""
    stops = stop_token_ids(tok)
    pool = [i for i in range(tok.vocab_size) if i not in stops]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        script = [pool[int(i)] for i in torch.randint(len(pool), (60,), generator=g)]
        cfg = TransformerConfig(
            vocab_size=tok.vocab_size, max_positions=128, d_model=16, n_heads=2, n_layers=1, d_ff=32
        )
        m = Scripted(cfg, script).eval()
        deltas = list(stream(m, tok, [7, 8], GenerationConfig(max_new_tokens=60, temperature=0)))
        assert "".join(d.text for d in deltas) == tok.decode(script)
        assert len(deltas) > 10
    # A token that is one invalid byte on its own and repeated: every window ends in U+FFFD.
    bad = next(t for t in pool if tok.decode([t] * 3) == "\ufffd" * 3)
    m = Scripted(cfg, [bad] * 30).eval()
    deltas = list(stream(m, tok, [7, 8], GenerationConfig(max_new_tokens=30, temperature=0)))
    assert "".join(d.text for d in deltas) == "\ufffd" * 30
    assert len(deltas) >= 29  # released as it comes, all but the newest (possibly unfinished) byte


def test_stream_holds_back_a_possible_stop_prefix(tok: Tokenizer) -> None:
    m = scripted(tok, "Hello world, hello there.")
    cfg = GenerationConfig(max_new_tokens=40, temperature=0, stop=["world!"])  # prefix seen, never completed
    deltas = list(stream(m, tok, "The", cfg))
    text = "".join(d.text for d in deltas)
    assert text.startswith("Hello world, hello there.")
    emitted = ""
    for d in deltas[:-1]:
        emitted += d.text
        assert not emitted.endswith(("w", "wo", "wor", "worl", "world"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("stop", [""]),
        ("stop", ["x"] * 17),
        ("top_logprobs", 21),
        ("seed", -3),
    ],
)
def test_invalid_parameters_name_the_parameter(
    model: Decoder, tok: Tokenizer, field: str, value: object
) -> None:
    cfg = GenerationConfig(logprobs=field == "top_logprobs")
    setattr(cfg, field, value)
    with pytest.raises(GenerationError, match=field.replace("stop", r"stop")):
        generate(model, tok, ["Hi"], cfg)
    with pytest.raises(ValueError, match=field):
        stream(model, tok, "Hi", cfg)  # raised at the call, before iteration


def test_top_logprobs_needs_logprobs() -> None:
    with pytest.raises(GenerationError, match="top_logprobs requires logprobs"):
        GenerationConfig(top_logprobs=3).validate()
