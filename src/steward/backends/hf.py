"""A local Hugging Face `transformers` model directory as a backend (any causal LM it can load).

Loaded with `local_files_only=True` (no hub access) and safetensors only; a directory that cannot
serve (no tokenizer, not a causal LM, corrupt weights, bad config.json) is refused at start, in one
line (`check_model_dir`, also run by `steward serve` before it binds). Requests run one at a time on
a dedicated thread (transformers' `generate` has no cross-request batching).

One `_Run` follows each generation, token by token (a stopping criterion): it decodes the completion
(never the prompt) incrementally, cuts it at the first stop sequence, stops generating there or when
the client has gone, and for a stream hands the text on as it becomes final. Streamed and returned
text are therefore the same text, cut at the same place. The prompt is templated and tokenised once per
request, off the event loop unless the gateway already counted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from steward.backends import builtin as _builtin
from steward.backends.base import JSON, BackendError, Call, ModelInfo
from steward.backends.builtin import _CHAT_FIELDS, _COMPLETION_DEFAULTS, _COMPLETION_FIELDS, _usage

log = logging.getLogger("steward.backends.hf")

# On the `Call` itself, (key, ids), so a request is tokenised once. Not in `call.metadata`: that is
# the request trace's `extra["upstream"]`, and the prompt's tokens have no place there.
_PROMPT_ATTR = "_steward_hf_prompt_ids"


def _closed_error() -> BackendError:
    return BackendError("server shutting down", status=503, type="server_error")


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unsupported(name: str, why: str = "") -> BackendError:
    return _builtin.unsupported(name, why, by="the hf backend")


def _check_fields(body: JSON, allowed: set[str], defaults: dict[str, object] | None = None) -> None:
    _builtin._check_fields(body, allowed, defaults, by="the hf backend")


def check_model_dir(path: Path) -> tuple[Any, Any, list[Path]]:
    """(config, tokenizer, safetensors files) of a directory the hf backend can serve, or a
    `BackendError` whose message is one line: `<path>: <what is wrong>`. Loads no weights (their
    headers are read, which finds a truncated file)."""
    path = Path(path)

    def bad(why: str) -> BackendError:
        return BackendError(f"{path}: {why}", status=500, type="server_error")

    try:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    except ImportError:
        raise BackendError(
            "the hf backend needs the transformers package (pip install 'steward[hf]')", status=500
        ) from None
    if not path.is_dir():
        raise BackendError(f"hf model directory not found: {path}", status=500, type="server_error")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise bad("no safetensors weights (pickle checkpoints are refused)")
    cfg_file = path / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad("no config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise bad(f"config.json is not valid JSON ({_short(exc)})") from None
    if not isinstance(raw, dict):
        raise bad("config.json must hold a JSON object")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise bad(f"config.json: {_short(exc)}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise bad(
            f"not a causal language model (model_type {getattr(config, 'model_type', None)!r}); "
            "the hf backend serves models AutoModelForCausalLM can load"
        )
    for w in weights:
        try:
            with safe_open(str(w), framework="pt"):
                pass
        except Exception as exc:
            raise bad(f"{w.name}: not a readable safetensors file ({_short(exc)})") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise bad(f"no usable tokenizer ({_short(exc)})") from None
    try:
        probe = tok("hello world", add_special_tokens=False)["input_ids"]
    except Exception:
        probe = []
    if len(tok) < 2 or not probe:
        raise bad(f"no usable tokenizer (no tokenizer files? {type(tok).__name__} has {len(tok)} tokens)")
    return config, tok, weights


class _Sampling:
    """Temperature, top-p and the draw itself as one logits processor: it returns the drawn token
    alone (0 there, -inf elsewhere) and transformers decodes greedily, so each request samples
    from its own `torch.Generator` (seeded by the request's `seed`, else from the OS) and never
    from torch's process-wide one, which other models' threads and every other caller in the
    process share (transformers' own sampling has no generator argument). A temperature so small
    that the scaled logits overflow float32 decodes greedily (the limit as the temperature goes
    to 0), as the built-in model does, instead of sampling from NaNs."""

    def __init__(self, temperature: float, top_p: float, seed: int | None = None) -> None:
        import torch
        from transformers import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p=top_p) if top_p < 1.0 else None
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed % (2**63))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        x = scores.float() / self.temperature
        overflow = ~torch.isfinite(x.amax(-1))
        x = torch.where(overflow[:, None], torch.zeros_like(x), x)  # any distribution; replaced below
        if self.top_p is not None:
            x = self.top_p(input_ids, x)
        drawn = torch.multinomial(torch.softmax(x, dim=-1), 1, generator=self.generator)
        drawn = torch.where(overflow[:, None], scores.argmax(-1, keepdim=True), drawn)
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter_(-1, drawn, 0.0)


class _Run:
    """One generation, followed token by token as a stopping criterion: the completion's text (cut
    at the first stop sequence, matched in the completion only), whether to stop (a stop matched, or
    `cancel` was set because the client went away) and, for a stream, `emit` of the text that no
    later token can change.

    The text is decoded incrementally, as transformers' `TextStreamer` and TGI do, never by decoding
    the whole completion again: each new token is decoded together with the previous piece's tokens
    (the context a SentencePiece-style decoder needs for a leading space) and what it adds to that
    piece's text is appended. Tokens that end in an incomplete UTF-8 character wait for the tokens
    that complete it. Appended text is never rewritten, and the pieces depend on the token ids only,
    so a stream and a plain call of the same generation get the same text, whatever the tokenizer's
    `decode` does (tokenization-space clean-up is off: the text is what the model generated). For a
    stream, a stop sequence's length less one character is held back until the next token or the
    end, so a stop is never sent."""

    # Tokens that may wait for an incomplete character: more than one UTF-8 character's bytes.
    MAX_PENDING = 8

    def __init__(
        self,
        tokenizer: Any,
        prompt_len: int,
        stops: list[str],
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emit = emit
        self.cancel = threading.Event()
        self.ids: list[int] = []  # the completion's tokens seen so far
        self.prefix = 0  # ids[prefix:read] are the last piece's tokens, decoded as `prefix_text`
        self.read = 0  # ids[:read] are in `text`
        self.prefix_text = ""
        self.text = ""
        self.sent = 0  # characters of `text` emitted
        self.scanned = 0  # characters of `text` searched for the stops
        self.stopped = False
        self.done = False

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        import torch

        if not self.stopped and (self.stops or self.emit is not None):
            self.update(input_ids[0, self.prompt_len :].tolist())
        stop = self.stopped or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _step(self, flush: bool) -> None:
        """Append the text of ids[read:] when it is complete (or `flush`)."""
        if self.read >= len(self.ids):
            return
        window = self._decode(self.ids[self.prefix :])
        if window.startswith(self.prefix_text):
            piece = window[len(self.prefix_text) :]
        else:  # the decoder rewrote the previous piece's text: that text stands, take the new alone
            piece = self._decode(self.ids[self.read :])
        pending = len(self.ids) - self.read
        if not flush and pending < self.MAX_PENDING and (not piece or piece.endswith("\ufffd")):
            return  # nothing yet, or an incomplete character: wait for the next token
        self.text += piece
        self.prefix, self.read = self.read, len(self.ids)
        self.prefix_text = self._decode(self.ids[self.prefix : self.read])

    def update(self, ids: list[int], final: bool = False) -> None:
        """Follow the completion to `ids` (its tokens so far; with `final`, all of them)."""
        if self.done:
            return
        # One token at a time, so the pieces are the same however often this is called.
        for token in ids[len(self.ids) :]:
            self.ids.append(int(token))
            self._step(flush=False)
        if final:
            self._step(flush=True)
        # A stop not found before lies (at least partly) in the text appended since.
        lo, cut = max(0, self.scanned - self.hold), -1
        for s in self.stops:
            i = self.text.find(s, lo)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        self.scanned = len(self.text)
        if cut >= 0:
            self.text, self.stopped, final = self.text[:cut], True, True
        if final:
            self.done = True
        if self.emit is None:
            return
        end = len(self.text) if final else len(self.text) - self.hold
        if end > self.sent:
            piece, self.sent = self.text[self.sent : end], end
            self.emit(piece)


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
        self._eos: set[int] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"steward-hf-{model_name}")
        self._runs: set[_Run] = set()
        self._closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        from steward.model.io import sha256_file

        try:
            config, tokenizer, weights = check_model_dir(self.path)
        except BackendError as exc:
            raise BackendError(f"model {self.model_name!r}: {exc.message}", status=500) from None
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.path, config=config, local_files_only=True, use_safetensors=True
            )
        except Exception as exc:
            raise BackendError(
                f"model {self.model_name!r}: {self.path}: not a loadable causal LM ({_short(exc)})",
                status=500,
            ) from None
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = self.model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        eos: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), cfg, tokenizer):
            e = getattr(source, "eos_token_id", None)
            eos.update([e] if isinstance(e, int) else [i for i in (e or []) if isinstance(i, int)])
        self._eos = eos
        self.weights_sha256 = sha256_file(weights[0]) if len(weights) == 1 else None

    async def aclose(self) -> None:
        # Queued requests are cancelled (they end with a 503) and the running one stops at its next
        # token, with a 503 as well: an answer cut short by the shutdown is not a complete answer.
        self._closed = True
        for run in list(self._runs):
            run.cancel.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

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

    # -- the prompt ---------------------------------------------------------------------------------
    def _prompt_ids(self, route: Literal["chat", "completions"], call: Call) -> list[int]:
        """The request's prompt as token ids: validated, templated and tokenised once per request."""
        cached = self._cached(route, call)
        if cached is not None:
            return cached
        ids = self._encode(route, call)
        setattr(call, _PROMPT_ATTR, (self._cache_key(route), ids))
        return list(ids)

    def _cache_key(self, route: str) -> str:
        # Per model: a fallback chain may hand the same call to another hf model (another tokenizer).
        return f"{route}\0{self.model_name}\0{self.path}"

    def _cached(self, route: Literal["chat", "completions"], call: Call) -> list[int] | None:
        cached = getattr(call, _PROMPT_ATTR, None)
        if isinstance(cached, tuple) and cached[0] == self._cache_key(route):
            return list(cached[1])
        return None

    def _encode(self, route: Literal["chat", "completions"], call: Call) -> list[int]:
        b = call.body
        tok = self.tokenizer
        if tok is None:
            raise BackendError(f"model {self.model_name!r} is not loaded", status=503, type="server_error")
        if b.get("n") not in (None, 1):
            raise _unsupported("n", "only n=1")
        if route == "chat":
            _check_fields(b, _CHAT_FIELDS)
            if b.get("logprobs"):
                raise _unsupported("logprobs")
            if b.get("top_logprobs"):
                raise _unsupported("top_logprobs")
            msgs = []
            for i, m in enumerate(b["messages"]):
                role = m.get("role")
                if role == "developer":
                    role = "system"
                content = m.get("content")
                if isinstance(content, list):
                    texts = []
                    for j, part in enumerate(content):
                        if not isinstance(part, dict) or part.get("type") != "text":
                            raise _unsupported(f"messages[{i}].content[{j}]", "only text parts")
                        texts.append(part.get("text") or "")
                    content = "".join(texts)
                if content is None:
                    content = ""
                if not isinstance(content, str):
                    raise BackendError(
                        f"messages[{i}].content: only text is supported", status=400, param="messages"
                    )
                msgs.append({"role": role, "content": content})
            if getattr(tok, "chat_template", None):
                try:
                    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                except Exception as exc:  # jinja2's TemplateError: the template refuses these messages
                    raise BackendError(
                        f"the chat template of model {self.model_name!r} refused the messages: {_short(exc)}",
                        status=400,
                        type="invalid_request_error",
                        param="messages",
                    ) from None
                # A rendered template holds its special tokens (BOS included): none are added again.
                ids = list(tok(str(text), add_special_tokens=False)["input_ids"])
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
                ids = list(tok(text)["input_ids"])
        else:
            _check_fields(b, _COMPLETION_FIELDS, _COMPLETION_DEFAULTS)
            if b.get("logprobs") is not None:
                raise _unsupported("logprobs")
            p = b["prompt"]
            if isinstance(p, list) and len(p) == 1:
                p = p[0]
            if not isinstance(p, str):
                raise BackendError("the hf backend takes one prompt per request", status=400, param="prompt")
            ids = list(tok(p)["input_ids"])
        if not ids:
            bos = getattr(tok, "bos_token_id", None)
            if bos is None:
                raise BackendError(
                    "the prompt is empty",
                    status=400,
                    type="invalid_request_error",
                    param="messages" if route == "chat" else "prompt",
                )
            ids = [bos]
        return [int(i) for i in ids]

    async def _prompt_ids_async(self, route: Literal["chat", "completions"], call: Call) -> list[int]:
        cached = self._cached(route, call)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self._prompt_ids, route, call)

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        return len(self._prompt_ids(route, call))

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

    def _gen_kwargs(
        self, route: Literal["chat", "completions"], call: Call
    ) -> tuple[dict[str, Any], list[str]]:
        from transformers import LogitsProcessorList

        b = call.body
        t = b.get("temperature")
        t = 1.0 if t is None else float(t)
        # Greedy in transformers' terms always: a sampled request's draw is `_Sampling`'s (its own
        # generator); the model's generation config may not turn transformers' sampling back on.
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens(route, call), "do_sample": False}
        kw.update(temperature=None, top_p=None, top_k=None)
        if t > 0:
            top_p = 1.0 if b.get("top_p") is None else float(b["top_p"])
            seed = b.get("seed")
            kw["logits_processor"] = LogitsProcessorList([_Sampling(t, top_p, seed)])
        pad = self.tokenizer.pad_token_id
        kw["pad_token_id"] = pad if pad is not None else self.tokenizer.eos_token_id
        stop = b.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str)]
        return kw, stops

    # -- generation (on the backend's thread) --------------------------------------------------------
    def _generate(self, ids: list[int], kw: dict[str, Any], run: _Run) -> tuple[str, int, int, str]:
        if self._closed:
            raise _closed_error()
        if run.cancel.is_set():  # the client left while this waited its turn
            return "", len(ids), 0, "stop"
        import torch
        from transformers import StoppingCriteriaList

        input_ids = torch.tensor([ids], dtype=torch.long)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    stopping_criteria=StoppingCriteriaList([run]),
                    **kw,
                )
        except Exception as exc:
            log.warning("model %r: generation failed: %s", self.model_name, _short(exc, 500))
            raise BackendError(
                f"model {self.model_name!r}: generation failed ({type(exc).__name__}: {_short(exc, 120)})",
                status=500,
                type="server_error",
            ) from None
        if self._closed and run.cancel.is_set():  # cut short by `aclose`
            raise _closed_error()
        new = [int(i) for i in out[0, len(ids) :].tolist()]
        run.update(new, final=True)
        if run.stopped or (new and new[-1] in self._eos):
            reason = "stop"
        elif len(new) >= kw["max_new_tokens"]:
            reason = "length"
        else:
            reason = "stop"
        return run.text, len(ids), len(new), reason

    async def _complete(self, route: Literal["chat", "completions"], call: Call) -> tuple[str, int, int, str]:
        ids = await self._prompt_ids_async(route, call)
        kw, stops = self._gen_kwargs(route, call)
        run = _Run(self.tokenizer, len(ids), stops)
        loop = asyncio.get_running_loop()
        self._runs.add(run)
        try:
            if self._closed:
                raise _closed_error()
            fut = loop.run_in_executor(self._pool, self._generate, ids, kw, run)
            try:
                return await fut
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and fut.cancelled() and not (task and task.cancelling()):
                    raise _closed_error() from None  # `aclose` cancelled it before its turn
                raise
        finally:  # done, failed or cancelled (the client went away): generation stops at its next token
            run.cancel.set()
            self._runs.discard(run)

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
        # Everything the request may be refused for is found before the first chunk.
        ids = await self._prompt_ids_async(route, call)
        kw, stops = self._gen_kwargs(route, call)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, payload: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(q.put_nowait, (kind, payload))

        run = _Run(self.tokenizer, len(ids), stops, emit=lambda piece: post("delta", piece))

        def job() -> None:
            try:
                post("end", self._generate(ids, kw, run))
            except BackendError as exc:
                post("error", exc)
            except Exception as exc:  # never leave the stream waiting
                log.warning("model %r: generation failed: %s", self.model_name, _short(exc, 500))
                post("error", BackendError(f"generation failed ({type(exc).__name__})", status=500))

        def never_ran(f: Any) -> None:
            if f.cancelled():  # shut down before its turn came
                post("error", _closed_error())

        chat = route == "chat"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id or uuid.uuid4().hex}"
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        self._runs.add(run)
        try:
            if self._closed:
                raise _closed_error()
            fut = loop.run_in_executor(self._pool, job)
            fut.add_done_callback(never_ran)
            if chat:
                yield {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
            while True:
                kind, payload = await q.get()
                if kind == "error":
                    raise payload
                if kind == "end":
                    break
                choice: JSON = (
                    {"index": 0, "delta": {"content": payload}} if chat else {"index": 0, "text": payload}
                )
                yield {**base, "choices": [{**choice, "finish_reason": None}]}
            _text, pt, ct, reason = payload
            end: JSON = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
            yield {**base, "choices": [{**end, "finish_reason": reason}]}
            yield {**base, "choices": [], "usage": _usage(pt, ct)}
        finally:  # finished, failed, or closed by a client that went away: stop generating
            run.cancel.set()
            self._runs.discard(run)

    async def embeddings(self, call: Call) -> JSON:
        raise BackendError(f"model {self.model_name!r} does not serve embeddings", status=400, param="model")
