"""The `hf` backend: a local `transformers` directory served through the gateway."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

from steward.backends.base import BackendError, Call  # noqa: E402
from steward.backends.hf import HFBackend  # noqa: E402
from steward.model.tokenizer import train_bpe  # noqa: E402


def make_model(directory: Path, *, bos: bool = False) -> Path:
    """A tiny GPT-2. With `bos`, a Llama-style tokenizer: it adds `<s>` itself, and its chat
    template starts with `{{ bos_token }}` as well."""
    import torch
    from tokenizers import processors

    torch.manual_seed(0)
    tok = train_bpe(["the sea is calm and the sky is blue", "hello there, how are you today?"] * 30, 300)
    tok.inner.add_special_tokens(["<|endoftext|>"])
    extra = {}
    if bos:
        tok.inner.add_special_tokens(["<s>"])
        tok.inner.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.inner.token_to_id("<s>"))]
        )
        extra["bos_token"] = "<s>"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.inner, eos_token="<|endoftext|>", **extra
    )
    if bos:
        fast.chat_template = (
            "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}"
        )
    fast.save_pretrained(directory)
    cfg = transformers.GPT2Config(
        vocab_size=len(fast),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("hf"))


def test_hf_backend_chat_stream_and_limits(hf_dir: Path) -> None:
    async def go() -> None:
        b = HFBackend("tiny", hf_dir, default_max_tokens=8)
        await b.start()
        info = b.models()[0]
        assert info.context_length == 64 and info.weights_sha256 and len(info.weights_sha256) == 64
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6,
            "temperature": 0,
        }
        r1 = await b.chat(Call(body=dict(body), upstream_model="tiny", request_id="a"))
        r2 = await b.chat(Call(body=dict(body), upstream_model="tiny", request_id="b"))
        assert r1["choices"][0]["message"]["content"] == r2["choices"][0]["message"]["content"]  # greedy
        assert 0 < r1["usage"]["completion_tokens"] <= 6
        chunks = [
            c
            async for c in b.chat_stream(
                Call(body={**body, "stream": True}, upstream_model="tiny", request_id="c")
            )
        ]
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        assert text == r1["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"]["completion_tokens"] == r1["usage"]["completion_tokens"]
        with pytest.raises(BackendError) as info_exc:
            b.max_new_tokens(
                "chat", Call(body={**body, "max_tokens": 500}, upstream_model="tiny", request_id="d")
            )
        assert info_exc.value.code == "context_length_exceeded"
        with pytest.raises(BackendError):
            await b.chat(
                Call(body={**body, "tools": [{"type": "function"}]}, upstream_model="tiny", request_id="e")
            )
        await b.aclose()

    asyncio.run(go())


def test_hf_backend_refuses_pickle_only_directories(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    b = HFBackend("x", tmp_path)
    with pytest.raises(BackendError, match="safetensors"):
        asyncio.run(b.start())


# -- review of the hf backend (findings 1, 2, 7-15) -------------------------------------------------
def _call(**body: Any) -> Call:
    return Call(body={"model": "tiny", **body}, upstream_model="tiny", request_id="t")


def _chat(**body: Any) -> Call:
    return _call(messages=[{"role": "user", "content": "hello"}], **body)


def _text(r: dict[str, Any]) -> str:
    ch = r["choices"][0]
    return str(ch["message"]["content"] if "message" in ch else ch["text"])


async def _collect(it: AsyncIterator[dict[str, Any]]) -> tuple[str, str | None, list[dict[str, Any]]]:
    chunks = [c async for c in it]
    parts = []
    for c in chunks:
        if c["choices"]:
            ch = c["choices"][0]
            parts.append((ch["delta"].get("content") or "") if "delta" in ch else ch["text"])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    return "".join(parts), reasons[-1], chunks


async def _loaded(path: Path) -> HFBackend:
    b = HFBackend("tiny", path, default_max_tokens=8)
    await b.start()
    return b


def _slow_forward(b: HFBackend, seconds: float, produced: list[int]) -> None:
    """Each decoding step takes `seconds`; `produced` gets the tokens each generate call made."""
    forward, generate = b.model.forward, b.model.generate

    def slow(*a: Any, **k: Any) -> Any:
        time.sleep(seconds)
        return forward(*a, **k)

    def counted(*a: Any, **k: Any) -> Any:
        out = generate(*a, **k)
        produced.append(int(out.shape[1] - k["input_ids"].shape[1]))
        return out

    b.model.forward = slow
    b.model.generate = counted


def test_a_generation_error_is_a_backend_error_and_ends_the_stream(hf_dir: Path) -> None:
    """Finding 1: the stream ends with the error at once (it used to wait out the streamer's
    600 s timeout), and the plain call raises a BackendError, not a bare RuntimeError (a 500)."""

    async def go() -> None:
        b = await _loaded(hf_dir)

        def broken(*a: Any, **k: Any) -> Any:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

        b.model.generate = broken
        with pytest.raises(BackendError) as exc:
            await b.chat(_chat(max_tokens=4))
        assert exc.value.status == 500 and "generation failed" in exc.value.message
        t0 = time.monotonic()
        with pytest.raises(BackendError) as exc:
            await asyncio.wait_for(_collect(b.chat_stream(_chat(max_tokens=4, stream=True))), 20)
        assert exc.value.status == 500 and time.monotonic() - t0 < 10
        with pytest.raises(BackendError):
            await asyncio.wait_for(_collect(b.completion_stream(_call(prompt="the sea", stream=True))), 20)
        await b.aclose()

    asyncio.run(go())


def test_a_temperature_too_small_to_sample_decodes_greedily(hf_dir: Path) -> None:
    """Finding 1: temperature=1e-40 passes the schema; logits / 1e-40 overflow to NaN
    probabilities. As in the built-in model, that is the greedy limit."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        greedy = _text(await b.chat(_chat(max_tokens=8, temperature=0)))
        for t in (1e-40, 1e-30):
            assert _text(await b.chat(_chat(max_tokens=8, temperature=t, seed=1))) == greedy
            text, reason, _ = await asyncio.wait_for(
                _collect(b.chat_stream(_chat(max_tokens=8, temperature=t, stream=True))), 30
            )
            assert text == greedy and reason == "length"
        r = await b.chat(_chat(max_tokens=8, temperature=0.7, top_p=0.5, seed=3))  # ordinary sampling
        assert r["usage"]["completion_tokens"] > 0
        await b.aclose()

    asyncio.run(go())


def test_streaming_applies_stop_sequences_as_the_plain_call_does(hf_dir: Path) -> None:
    """Finding 2: the stream is cut where the plain answer is, never sends the stop text, and
    ends with finish_reason "stop"."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        cases = [
            (_chat, {}, (":is", "sisi", "::i", "is")),
            (_call, {"prompt": "the sea is"}, ("s i", " is is", "is ", "\ufffd\ufffd")),
        ]
        checked = 0
        for make, extra, stops in cases:
            chat = make is _chat
            full_r = await (b.chat if chat else b.completion)(make(**extra, max_tokens=30, temperature=0))
            full = _text(full_r)
            for stop in stops:
                if stop not in full:
                    continue
                checked += 1
                expect = full[: full.find(stop)]
                for stop_field in (stop, [stop, "never-there"]):
                    call = make(**extra, max_tokens=30, temperature=0, stop=stop_field)
                    r = await (b.chat if chat else b.completion)(call)
                    assert (_text(r), r["choices"][0]["finish_reason"]) == (expect, "stop"), stop
                    scall = make(**extra, max_tokens=30, temperature=0, stop=stop_field, stream=True)
                    text, reason, chunks = await _collect(
                        b.chat_stream(scall) if chat else b.completion_stream(scall)
                    )
                    assert (text, reason) == (expect, "stop"), (stop, text)
                    sent = [
                        (c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                        for c in chunks
                        if c["choices"]
                    ]
                    assert all(stop not in p for p in sent)
                    assert chunks[-1]["usage"] == r["usage"]
        assert checked >= 5
        await b.aclose()

    asyncio.run(go())


def test_stop_sequences_match_the_completion_only(hf_dir: Path) -> None:
    """Finding 9: a stop that would only match across the prompt boundary does not end generation."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        base = {"prompt": "the sea is", "max_tokens": 20, "temperature": 0}
        full = await b.completion(_call(**base))
        assert "sea is is" not in _text(full) and full["choices"][0]["finish_reason"] == "length"
        r = await b.completion(_call(**base, stop="sea is is"))
        assert _text(r) == _text(full) and r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == 20
        text, reason, _ = await _collect(b.completion_stream(_call(**base, stop="sea is is", stream=True)))
        assert (text, reason) == (_text(full), "length")
        await b.aclose()

    asyncio.run(go())


def test_a_client_that_goes_away_stops_generation(hf_dir: Path) -> None:
    """Finding 10: a closed stream or a cancelled call stops generating at the next token, so the
    next request does not wait behind an abandoned one."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        produced: list[int] = []
        _slow_forward(b, 0.05, produced)
        body = {"max_tokens": 40, "temperature": 0}
        gen = b.chat_stream(_chat(**body, stream=True))
        first = await gen.__anext__()
        assert first["choices"][0]["delta"]["role"] == "assistant"
        while True:
            c = await gen.__anext__()
            if c["choices"] and c["choices"][0]["delta"].get("content"):
                break
        await gen.aclose()  # the client went away
        t0 = time.monotonic()
        r = await b.chat(_chat(max_tokens=1, temperature=0))
        assert r["usage"]["completion_tokens"] == 1
        assert produced[0] < 20, produced
        assert time.monotonic() - t0 < 1.0

        task = asyncio.ensure_future(b.chat(_chat(**body)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        await b.chat(_chat(max_tokens=1, temperature=0))
        assert produced[2] < 30, produced
        assert time.monotonic() - t0 < 1.0
        await b.aclose()

    asyncio.run(go())


def test_openai_defaults_sent_explicitly_are_accepted(hf_dir: Path) -> None:
    """Finding 11."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        for extra in ({"n": 1}, {"logprobs": False}, {"top_logprobs": 0}, {"n": 1, "logprobs": False}):
            r = await b.chat(_chat(max_tokens=2, temperature=0, **extra))
            assert r["usage"]["completion_tokens"] > 0
        for extra in ({"n": 1}, {"echo": False}, {"best_of": 1}, {"prompt": ["the sea"]}):
            r = await b.completion(_call(**{"prompt": "the sea", "max_tokens": 2, "temperature": 0, **extra}))
            assert r["usage"]["completion_tokens"] > 0
        for make, extra, name in (
            (_chat, {"n": 2}, "n"),
            (_chat, {"logprobs": True}, "logprobs"),
            (_chat, {"tools": [{"type": "function"}]}, "tools"),
            (_call, {"prompt": "x", "echo": True}, "echo"),
            (_call, {"prompt": "x", "logprobs": 0}, "logprobs"),
        ):
            with pytest.raises(BackendError) as exc:
                b.count_prompt_tokens("chat" if make is _chat else "completions", make(**extra))
            assert exc.value.status == 400 and exc.value.param == name
            assert "hf backend" in exc.value.message and "built-in" not in exc.value.message
        with pytest.raises(BackendError, match="one prompt"):
            b.count_prompt_tokens("completions", _call(prompt=["a", "b"]))
        await b.aclose()

    asyncio.run(go())


def test_a_chat_template_that_refuses_the_messages_is_a_400(hf_dir: Path) -> None:
    """Finding 12: the template's own message, as a 400 on `messages`; `developer` is `system`."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        b.tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
            "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
            "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
        )
        msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"}]
        for call in (_call(messages=msgs), _call(messages=msgs, stream=True)):
            with pytest.raises(BackendError) as exc:
                b.count_prompt_tokens("chat", call)
            assert (exc.value.status, exc.value.param) == (400, "messages")
            assert "Only user and assistant roles are supported!" in exc.value.message
        with pytest.raises(BackendError) as exc:
            await b.chat(_call(messages=msgs, max_tokens=2))
        assert exc.value.status == 400
        with pytest.raises(BackendError) as exc:
            await _collect(b.chat_stream(_call(messages=msgs, max_tokens=2, stream=True)))
        assert exc.value.status == 400

        seen: list[list[dict[str, Any]]] = []
        render = b.tokenizer.apply_chat_template

        def spy(messages: list[dict[str, Any]], **k: Any) -> Any:
            seen.append(messages)
            return render(messages, **k)

        b.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        b.tokenizer.apply_chat_template = spy
        dev = [{"role": "developer", "content": "be nice"}, {"role": "user", "content": "hello"}]
        await b.chat(_call(messages=dev, max_tokens=2, temperature=0))
        assert [m["role"] for m in seen[-1]] == ["system", "user"]
        await b.aclose()

    asyncio.run(go())


def test_a_templated_prompt_gets_one_bos_and_is_counted_exactly(tmp_path: Path) -> None:
    """Finding 13: the rendered template already holds `<s>`; the tokenizer must not add another."""

    async def go() -> None:
        b = await _loaded(make_model(tmp_path, bos=True))
        bos = b.tokenizer.bos_token_id
        fed: list[list[int]] = []
        generate = b.model.generate

        def spy(*a: Any, **k: Any) -> Any:
            fed.append(k["input_ids"][0].tolist())
            return generate(*a, **k)

        b.model.generate = spy
        call = _chat(max_tokens=2, temperature=0)
        n = b.count_prompt_tokens("chat", call)
        r = await b.chat(call)
        rendered = b.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
        )
        exact = b.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert fed[0] == exact and fed[0].count(bos) == 1 and fed[0][0] == bos
        assert n == r["usage"]["prompt_tokens"] == len(exact)
        _, _, chunks = await _collect(b.chat_stream(_chat(max_tokens=2, temperature=0, stream=True)))
        assert fed[1] == exact and chunks[-1]["usage"]["prompt_tokens"] == len(exact)
        # A plain completion prompt still gets the tokenizer's own BOS, once.
        r = await b.completion(_call(prompt="the sea", max_tokens=1, temperature=0))
        assert fed[2][0] == bos and fed[2].count(bos) == 1
        await b.aclose()

    asyncio.run(go())


def test_finish_reason_is_stop_when_the_last_allowed_token_is_eos(hf_dir: Path) -> None:
    """Finding 14."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        found = None
        for seed in range(60):
            r = await b.chat(_chat(max_tokens=40, temperature=1.0, seed=seed))
            if r["choices"][0]["finish_reason"] == "stop":
                found = seed, r["usage"]["completion_tokens"], _text(r)
                break
        assert found is not None
        seed, n, text = found
        r = await b.chat(_chat(max_tokens=n, temperature=1.0, seed=seed))
        assert (_text(r), r["usage"]["completion_tokens"]) == (text, n)
        assert r["choices"][0]["finish_reason"] == "stop"
        _t, reason, _ = await _collect(
            b.chat_stream(_chat(max_tokens=n, temperature=1.0, seed=seed, stream=True))
        )
        assert reason == "stop"
        r = await b.chat(_chat(max_tokens=n - 1, temperature=1.0, seed=seed))
        assert r["choices"][0]["finish_reason"] == "length"
        await b.aclose()

    asyncio.run(go())


def test_the_prompt_is_templated_once_per_request_and_off_the_loop(hf_dir: Path) -> None:
    """Finding 15: counting, the token budget and the call itself share one rendering; a call the
    gateway did not count renders in a worker thread, not on the event loop."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        b.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        threads: list[int] = []
        render = b.tokenizer.apply_chat_template

        def spy(messages: list[dict[str, Any]], **k: Any) -> Any:
            threads.append(threading.get_ident())
            return render(messages, **k)

        b.tokenizer.apply_chat_template = spy
        loop_thread = threading.get_ident()
        call = _chat(max_tokens=2, temperature=0)
        b.count_prompt_tokens("chat", call)  # the gateway's estimate
        b.max_new_tokens("chat", call)  # and its budget
        await b.chat(call)
        assert len(threads) == 1
        threads.clear()
        await b.chat(_chat(max_tokens=2, temperature=0))
        await _collect(b.chat_stream(_chat(max_tokens=2, temperature=0, stream=True)))
        assert len(threads) == 2 and loop_thread not in threads
        await b.aclose()

    asyncio.run(go())


# -- findings 7, 8: a directory that cannot serve is refused at start, in one line ---------------
def _bad_dirs(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    import shutil

    out: dict[str, tuple[Path, str]] = {}
    d = root / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, d / f)
    out["notok"] = d, "no usable tokenizer"

    d = root / "corrupt"
    shutil.copytree(src, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out["corrupt"] = d, "model.safetensors: not a readable safetensors file"

    d = root / "badcfg"
    shutil.copytree(src, d)
    (d / "config.json").write_text("{not json")
    out["badcfg"] = d, "config.json is not valid JSON"

    d = root / "t5"
    shutil.copytree(src, d)
    (d / "config.json").unlink()
    (d / "model.safetensors").unlink()
    cfg = transformers.T5Config(
        vocab_size=320, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(d, safe_serialization=True)
    out["t5"] = d, "not a causal language model (model_type 't5')"
    return out


@pytest.fixture(scope="module")
def bad_dirs(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return _bad_dirs(hf_dir, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["notok", "corrupt", "badcfg", "t5"])
def test_a_directory_that_cannot_serve_fails_to_start(
    case: str, bad_dirs: dict[str, tuple[Path, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steward.commands.serve import _preflight
    from steward.gateway.settings import ConfigError, Settings

    path, why = bad_dirs[case]
    b = HFBackend("mine", path)
    with pytest.raises(BackendError) as exc:
        asyncio.run(b.start())
    msg = exc.value.message
    assert msg.startswith(f"model 'mine': {path}: ") and why in msg and "\n" not in msg and len(msg) < 400

    for k in [k for k in os.environ if k.startswith("STEWARD_")]:
        monkeypatch.delenv(k)
    settings = Settings(
        data_dir=tmp_path / "d",
        embedding_model="",
        models=[{"name": "mine", "backend": "hf", "path": str(path)}],
    )
    with pytest.raises(ConfigError) as cexc:
        _preflight(settings)
    line = str(cexc.value)
    assert line.startswith(f"invalid setting models.0.path: model 'mine': {path}: ") and why in line
    assert "\n" not in line and len(line) < 450
    assert not (tmp_path / "d").exists()  # refused before the store is touched


def test_serve_refuses_a_model_dir_without_a_tokenizer_in_one_line(
    bad_dirs: dict[str, tuple[Path, str]], tmp_path: Path
) -> None:
    """It used to log "ready" and answer every request with a 500."""
    path, why = bad_dirs["notok"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models: [{{name: mine, backend: hf, path: '{path}'}}]\nguards: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEWARD_")}
    env.update({"STEWARD_DATA_DIR": str(tmp_path / "d"), "OMP_NUM_THREADS": "1"})
    r = subprocess.run(
        [sys.executable, "-m", "steward.cli", "serve", "--config", str(cfg), "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = r.stderr.strip()
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr[-2000:])
    assert "\n" not in err and err.startswith("steward: error: invalid setting models.0.path: model 'mine'")
    assert why in err


# -- review of the rewrite: M3 (and item 5), items 3 and 4 ------------------------------------------
class _CleanupTok:
    """A tokenizer whose `decode` rewrites text across token boundaries, whatever it is asked:
    transformers' `clean_up_tokenization` (" ' " becomes "'" once the next token brings the space)."""

    def __init__(self, vocab: list[str]) -> None:
        self.vocab = vocab
        self.decoded = 0  # tokens decoded, all calls together

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded += len(ids)
        text = "".join(self.vocab[i] for i in ids)
        return str(transformers.PreTrainedTokenizerBase.clean_up_tokenization(None, text))


def _follow(tok: Any, ids: list[int], stops: tuple[str, ...] = ()) -> tuple[str, list[str], str]:
    """(streamed text, its pieces, the plain call's text) of one generation, as `_generate` and
    the stopping criterion drive `_Run`: token by token for the stream, at the end for the plain
    call (token by token as well when there are stops)."""
    from steward.backends.hf import _Run

    pieces: list[str] = []
    streamed = _Run(tok, 0, list(stops), emit=pieces.append)
    plain = _Run(tok, 0, list(stops))
    for n in range(1, len(ids) + 1):
        streamed.update(ids[:n])
        if stops:
            plain.update(ids[:n])
    streamed.update(ids, final=True)
    plain.update(ids, final=True)
    assert streamed.text == "".join(pieces)
    return "".join(pieces), pieces, plain.text


def test_a_stream_is_not_cut_short_when_decode_rewrites_sent_text() -> None:
    """M3: decoding the whole completion each token, the stream stopped at "He said '" (the decode
    had rewritten it) and ended "stop", while the plain call returned all of it."""
    vocab = ["He", " said", " '", " hi", " '", " ok", "."]
    ids = list(range(len(vocab)))
    streamed, pieces, plain = _follow(_CleanupTok(vocab), ids)
    assert streamed == plain and plain.endswith(" ok.") and len(pieces) > 1
    # Stops still cut exactly, and are never sent.
    for stop in (" ok", "ok.", " '", "hi"):
        streamed, pieces, plain = _follow(_CleanupTok(vocab), ids, (stop,))
        assert streamed == plain == "".join(vocab)[: "".join(vocab).find(stop)], stop
        assert all(stop not in p for p in pieces)


def test_the_completion_is_decoded_incrementally_not_again_per_token() -> None:
    """Item 5: each token used to decode the whole completion again (n**2 / 2 tokens decoded)."""
    vocab = [" the", " sea", " is", " calm", ",", " '", "."]
    ids = [i % len(vocab) for i in range(400)]
    for stops in ((), ("never there",)):
        tok = _CleanupTok(vocab)
        streamed, _, plain = _follow(tok, ids, stops)
        assert streamed == plain and len(plain) > 1000
        assert tok.decoded < 20 * len(ids), tok.decoded


def test_incremental_decoding_keeps_multibyte_characters_whole(hf_dir: Path) -> None:
    """A byte-level tokenizer splits "中" and "é" over tokens: no piece holds half of one."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "the café is 中文 calm — ok ✓ 𝄞!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # many single-byte tokens
    streamed, pieces, plain = _follow(tok, ids)
    assert streamed == plain == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    for stop in ("文", "中文 c", "✓", "𝄞"):
        streamed, pieces, plain = _follow(tok, ids, (stop,))
        assert streamed == plain == text[: text.find(stop)], stop
        assert all("\ufffd" not in p and stop not in p for p in pieces)


def test_streamed_text_is_the_plain_text_with_a_cleaning_decode(hf_dir: Path) -> None:
    """M3 through the backend: a tokenizer that cleans up tokenization spaces on every decode."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        decode = b.tokenizer.decode
        rewrite = transformers.PreTrainedTokenizerBase.clean_up_tokenization

        def cleaning(ids: Any, **k: Any) -> str:
            # Its rules and one more of their kind, which this vocabulary meets often: the next
            # token's leading space rewrites the text before it.
            text = rewrite(None, decode(ids, **k))
            return re.sub(r"(\w) ", lambda m: m.group(1).upper() + " ", text)

        b.tokenizer.decode = cleaning
        for seed in range(6):
            body = {"max_tokens": 30, "temperature": 1.0, "seed": seed}
            plain = await b.chat(_chat(**body))
            text, reason, chunks = await _collect(b.chat_stream(_chat(**body, stream=True)))
            assert text == _text(plain), seed
            assert reason == plain["choices"][0]["finish_reason"]
            assert chunks[-1]["usage"] == plain["usage"]
        await b.aclose()

    asyncio.run(go())


def test_aclose_ends_queued_requests_with_a_503(hf_dir: Path) -> None:
    """Item 4: requests waiting their turn when the backend closes end with a 503, not with an
    empty answer and finish_reason "stop"; so does the one cut short."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        _slow_forward(b, 0.05, [])
        body = {"max_tokens": 40, "temperature": 0}
        running = b.chat_stream(_chat(**body, stream=True))
        while True:
            c = await running.__anext__()
            if c["choices"] and c["choices"][0]["delta"].get("content"):
                break
        queued = [
            asyncio.ensure_future(_collect(b.chat_stream(_chat(**body, stream=True)))),
            asyncio.ensure_future(
                _collect(b.completion_stream(_call(prompt="the sea", **body, stream=True)))
            ),
            asyncio.ensure_future(b.chat(_chat(**body))),
            asyncio.ensure_future(b.completion(_call(prompt="the sea", **body))),
        ]
        await asyncio.sleep(0.3)  # all queued behind the running one
        assert not any(t.done() for t in queued)
        await b.aclose()
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 20)
        for r in results:
            assert isinstance(r, BackendError) and r.status == 503, r
        with pytest.raises(BackendError) as exc:
            await asyncio.wait_for(_collect(running), 20)
        assert exc.value.status == 503
        with pytest.raises(BackendError) as exc:  # and after the close
            await b.chat(_chat(**body))
        assert exc.value.status == 503

    asyncio.run(go())


def test_the_prompt_tokens_stay_out_of_the_call_metadata(hf_dir: Path) -> None:
    """Item 3: `call.metadata` is the trace's `extra["upstream"]`; the per-request prompt cache
    (the whole prompt's token ids) is kept elsewhere, and the prompt is still tokenised once."""

    async def go() -> None:
        b = await _loaded(hf_dir)
        encode = b._encode
        encoded: list[Call] = []

        def spy(route: Any, call: Call) -> list[int]:
            encoded.append(call)
            return encode(route, call)

        b._encode = spy  # type: ignore[method-assign]
        call = _chat(max_tokens=2, temperature=0)
        b.count_prompt_tokens("chat", call)
        await b.chat(call)
        scall = _chat(max_tokens=2, temperature=0, stream=True)
        b.count_prompt_tokens("chat", scall)
        await _collect(b.chat_stream(scall))
        assert encoded == [call, scall]
        assert call.metadata == {} and scall.metadata == {}
        await b.aclose()

    asyncio.run(go())


def test_sampling_neither_reads_nor_moves_the_process_random_state(hf_dir: Path) -> None:
    """Each hf generation samples from its own `torch.Generator` (seeded by the request's `seed`),
    never from torch's process-wide one: with `torch.manual_seed` per request, two models (each on
    its own thread) or a seeded and an unseeded request drew from one shared stream, so a seeded
    request did not reproduce while another one ran, and every hf request reset the random state
    of everything else in the process."""
    import torch

    async def go() -> None:
        a, b = await _loaded(hf_dir), await _loaded(hf_dir)
        seeded = _chat(max_tokens=40, temperature=1.0, seed=11)
        alone = _text(await a.chat(seeded))

        torch.manual_seed(1234)
        before = torch.get_rng_state()
        assert _text(await a.chat(_chat(max_tokens=40, temperature=1.0, seed=11))) == alone
        await b.chat(_chat(max_tokens=40, temperature=1.0))  # unseeded
        assert torch.equal(torch.get_rng_state(), before)

        # a seeded request while the other model samples unseeded requests, step by step
        stop = asyncio.Event()

        async def noise() -> None:
            while not stop.is_set():
                await b.chat(_chat(max_tokens=40, temperature=1.0))

        task = asyncio.create_task(noise())
        try:
            for _ in range(3):
                assert _text(await a.chat(_chat(max_tokens=40, temperature=1.0, seed=11))) == alone
        finally:
            stop.set()
            await task
        # a process-wide seed no longer decides unseeded requests: they differ from run to run
        texts = set()
        for _ in range(4):
            torch.manual_seed(0)
            texts.add(_text(await a.chat(_chat(max_tokens=40, temperature=1.0))))
        assert len(texts) > 1
        await a.aclose()
        await b.aclose()

    asyncio.run(go())
