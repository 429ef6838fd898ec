"""The `hf` backend: a local `transformers` directory served through the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from steward.backends.base import BackendError, Call  # noqa: E402
from steward.backends.hf import HFBackend  # noqa: E402
from steward.model.tokenizer import train_bpe  # noqa: E402


def make_model(directory: Path) -> Path:
    import torch

    torch.manual_seed(0)
    tok = train_bpe(["the sea is calm and the sky is blue", "hello there, how are you today?"] * 30, 300)
    tok.inner.add_special_tokens(["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.inner, eos_token="<|endoftext|>")
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
