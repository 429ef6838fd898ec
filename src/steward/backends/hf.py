"""A local Hugging Face `transformers` model directory as a backend (any causal LM it can load).

Loaded with `local_files_only=True` (no hub access) and safetensors only. Requests run one at a time
on a dedicated thread (transformers' `generate` has no cross-request batching); streaming uses
`TextIteratorStreamer`, so deltas arrive as tokens are produced.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from steward.backends.base import JSON, BackendError, Call, ModelInfo
from steward.backends.builtin import _CHAT_FIELDS, _COMPLETION_FIELDS, _check_fields, _usage


class HFBackend:
    name = "hf"

    def __init__(self, model_name: str, path: Path, *, default_max_tokens: int = 256) -> None:
        self.model_name = model_name
        self.path = Path(path)
        self.default_max_tokens = default_max_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length: int | None = None
        self.weights_sha256: str | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"steward-hf-{model_name}")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise BackendError(
                "the hf backend needs the transformers package (pip install 'steward[hf]')", status=500
            ) from None
        from steward.model.io import sha256_file

        if not self.path.is_dir():
            raise BackendError(f"hf model directory not found: {self.path}", status=500)
        weights = sorted(self.path.glob("*.safetensors"))
        if not weights:
            raise BackendError(
                f"{self.path}: no safetensors weights (pickle checkpoints are refused)", status=500
            )
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, local_files_only=True, use_safetensors=True
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        cfg = self.model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        self.weights_sha256 = sha256_file(weights[0]) if len(weights) == 1 else None

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False)

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=self.model_name,
                backend="hf",
                context_length=self.context_length,
                weights_sha256=self.weights_sha256,
                owned_by="local",
            )
        ]

    def _prompt(self, route: Literal["chat", "completions"], call: Call) -> str:
        b = call.body
        if route == "chat":
            _check_fields(b, _CHAT_FIELDS - {"logprobs", "top_logprobs", "n"})
            msgs = [{"role": m["role"], "content": m.get("content") or ""} for m in b["messages"]]
            for i, m in enumerate(msgs):
                if not isinstance(m["content"], str):
                    raise BackendError(
                        f"messages[{i}].content: only text is supported", status=400, param="messages"
                    )
            if getattr(self.tokenizer, "chat_template", None):
                return str(
                    self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                )
            return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        _check_fields(b, _COMPLETION_FIELDS - {"logprobs", "n"})
        p = b["prompt"]
        if not isinstance(p, str):
            raise BackendError("the hf backend takes one prompt per request", status=400, param="prompt")
        return p

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        ids = self.tokenizer(self._prompt(route, call))["input_ids"]
        return len(ids)

    def max_new_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        n = self.count_prompt_tokens(route, call)
        asked = call.body.get("max_completion_tokens") or call.body.get("max_tokens")
        ctx = self.context_length or (n + (asked or self.default_max_tokens))
        room = ctx - n
        if room < 1 or (asked is not None and asked > room):
            raise BackendError(
                f"this model's maximum context length is {ctx} tokens; the request needs {n + (asked or 1)}",
                status=400,
                type="invalid_request_error",
                code="context_length_exceeded",
            )
        return int(asked) if asked is not None else min(self.default_max_tokens, room)

    def _gen_kwargs(self, route: Literal["chat", "completions"], call: Call) -> dict[str, Any]:
        b = call.body
        t = b.get("temperature")
        t = 1.0 if t is None else float(t)
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens(route, call), "do_sample": t > 0}
        if t > 0:
            kw["temperature"] = t
            kw["top_p"] = float(b.get("top_p") or 1.0)
            kw["top_k"] = 0
        stop = b.get("stop")
        if stop:
            kw["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
            kw["tokenizer"] = self.tokenizer
        pad = self.tokenizer.pad_token_id
        kw["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        return kw

    def _run(
        self, prompt: str, kw: dict[str, Any], seed: int | None, streamer: Any = None
    ) -> tuple[str, int, int, str]:
        import torch

        if seed is not None:
            torch.manual_seed(seed % (2**63))
        enc = self.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw, streamer=streamer)
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        stops = kw.get("stop_strings") or []
        reason = "length" if len(new) >= kw["max_new_tokens"] else "stop"
        for s in stops:
            i = text.find(s)
            if i >= 0:
                text, reason = text[:i], "stop"
        return text, int(enc["input_ids"].shape[1]), len(new), reason

    async def _complete(self, route: Literal["chat", "completions"], call: Call) -> tuple[str, int, int, str]:
        prompt = self._prompt(route, call)
        kw = self._gen_kwargs(route, call)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, prompt, kw, call.body.get("seed"))

    async def chat(self, call: Call) -> JSON:
        text, pt, ct, reason = await self._complete("chat", call)
        return {
            "id": f"chatcmpl-{call.request_id or uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": _usage(pt, ct),
        }

    async def completion(self, call: Call) -> JSON:
        text, pt, ct, reason = await self._complete("completions", call)
        return {
            "id": f"cmpl-{call.request_id or uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": _usage(pt, ct),
        }

    def chat_stream(self, call: Call) -> AsyncIterator[JSON]:
        return self._stream("chat", call)

    def completion_stream(self, call: Call) -> AsyncIterator[JSON]:
        return self._stream("completions", call)

    async def _stream(self, route: Literal["chat", "completions"], call: Call) -> AsyncIterator[JSON]:
        from transformers import TextIteratorStreamer

        prompt = self._prompt(route, call)
        kw = self._gen_kwargs(route, call)
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._run, prompt, kw, call.body.get("seed"), streamer)
        chat = route == "chat"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id or uuid.uuid4().hex}"
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if chat:
            yield {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
        sentinel = object()
        it = iter(streamer)
        while True:
            piece = await asyncio.to_thread(next, it, sentinel)
            if piece is sentinel:
                break
            assert isinstance(piece, str)
            if piece:
                choice: JSON = (
                    {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
                )
                yield {**base, "choices": [{**choice, "finish_reason": None}]}
        _text, pt, ct, reason = await fut
        end: JSON = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
        yield {**base, "choices": [{**end, "finish_reason": reason}]}
        yield {**base, "choices": [], "usage": _usage(pt, ct)}

    async def embeddings(self, call: Call) -> JSON:
        raise BackendError(f"model {self.model_name!r} does not serve embeddings", status=400, param="model")
