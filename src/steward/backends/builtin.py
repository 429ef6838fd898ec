"""In-process backends: the built-in decoder (chat, completions) and the MiniLM encoder (embeddings).

Concurrent requests share forward passes. One worker thread owns the decoder: when idle it takes every
request that arrived within `batch_wait_ms` (up to `max_batch` rows), groups them by sampling
parameters and starts a batch per group. It advances all running batches one decoding step each in
turn, and between steps starts batches for requests that arrived meanwhile (up to
`_RUNNING_BATCHES` x `max_batch` rows in flight), so a short request never waits for a long one to
finish (no head-of-line blocking), in its sampling group or another. Rows are not moved between
batches: a newcomer gets a batch of its own rather than a slot in a running one (true continuous
batching would merge KV caches; see `_worker`). Results flow back to the event loop through
`call_soon_threadsafe`; the event loop never runs torch.

Seeded requests ("deterministic when asked"). Every row samples from its own seeded stream (see
`steward.model.generate`), but that alone does not make a seeded request repeatable: the forward
pass of a row is not bitwise the same at every batch size (oneDNN's packed GEMM for several rows,
MKL for one; left padding; compaction), and inverse-CDF sampling turns a last-digit change in the
logits into another token whenever a row's uniform falls near a CDF boundary. So a request with a
`seed` never shares a forward pass: each of its rows (each choice of `n`) is decoded alone, one
after another, as a batch of one with its prompt unpadded, and the weights are packed once at load
so no earlier batch changes which kernels a later one uses. Its text and logprobs are then the same
whatever else is queued, streamed or not, and choice 0 of `n` equals the `n`=1 answer (same seed,
same computation). The price is paid by seeded requests only: their rows decode one at a time
(n=4 costs about four single decodes, instead of one batched decode a little slower than a single
one: ~450 against ~820 tokens/s on one core), and concurrent seeded requests each run as batches
of one, side by side (~460 against ~1500 tokens/s for 8 at once). Making the kernels
batch-invariant instead would slow every request; unseeded requests keep sharing batches.

Failures are contained per request. A row whose bookkeeping raises (detokenising, stop strings)
ends only its request, with a 500. A failed forward pass takes down its batch; every request in it
that has not streamed anything yet is then retried alone, once, so only the one that fails alone
gets the 500 (a stream that has sent tokens cannot be restarted, so it ends with the error). A
request that finishes is answered at once, not when the longest row of its batch ends.

Logprobs are those of the model's raw distribution (log-softmax of the logits, before temperature
and top_p), as vLLM reports them by default: they describe the model, not the distribution the
token was sampled from (see `steward.model.generate`).

Shutdown: `aclose()` refuses new requests with a 503 from the moment it starts; the batches being
decoded then finish, and every request still queued gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from steward.backends.base import JSON, BackendError, Call, ModelInfo

if TYPE_CHECKING:
    from steward.model.embedding import SentenceEncoder
    from steward.model.generate import Delta, GenerationConfig, Row, TokenLogprob, TopLogprob
    from steward.model.tokenizer import Tokenizer
    from steward.model.transformer import Decoder

# Fields the built-in model reads; fields it can safely ignore; anything else is refused by name.
_CHAT_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
}
_COMPLETION_FIELDS = {
    "model",
    "prompt",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "max_tokens",
    "logprobs",
}
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_ZERO_OK = {"frequency_penalty", "presence_penalty"}  # accepted when 0 (the model applies none)
# Completions fields accepted at their API default, which asks for nothing the model lacks.
_COMPLETION_DEFAULTS: dict[str, object] = {"echo": False, "best_of": 1}
MAX_N = 16
# Batches the worker advances side by side, in units of `max_batch` rows: room for requests that
# arrive while others decode, within a bounded number of KV caches.
_RUNNING_BATCHES = 4
_SEED_STRIDE = 0x9E3779B97F4A7C15


def unsupported(name: str, why: str = "", by: str = "the built-in model") -> BackendError:
    """A 400 naming the parameter and the backend (`by`) that refuses it."""
    return BackendError(
        f"parameter {name!r} is not supported by {by}{': ' + why if why else ''}",
        status=400,
        type="invalid_request_error",
        code="unsupported_parameter",
        param=name,
    )


def _check_fields(
    body: JSON,
    allowed: set[str],
    defaults: dict[str, object] | None = None,
    by: str = "the built-in model",
) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED or value is None:
            continue
        if name in _ZERO_OK and value == 0:
            continue
        if name == "logit_bias" and not value:
            continue
        if defaults and name in defaults:
            default = defaults[name]
            if type(value) is type(default) and value == default:  # True is not best_of 1
                continue
        raise unsupported(name, by=by)


def choice_seeds(seed: int | None, n: int) -> list[int]:
    """Choice 0 uses the request's seed itself, so n=1 and the first of n agree (each choice of a
    seeded request is decoded alone, see the module docstring)."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(n)]
    return [(seed + i * _SEED_STRIDE) % (2**63) for i in range(n)]


@dataclass
class _Job:
    prompt: list[int]
    cfg: GenerationConfig
    seeds: list[int]
    stream: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[tuple[str, int, Any]]
    rows: list[Row] = field(default_factory=list)
    cancelled: bool = False
    sent: bool = False  # a streamed delta went out: the job can no longer be restarted
    answered: bool = False  # its last message ("done", "end" or "error") is posted

    def post(self, kind: str, index: int, payload: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, index, payload))

    def fail(self, err: BackendError) -> None:
        """Answer with `err` (once) and drop the job's rows from whatever batch holds them."""
        if not self.answered:
            self.answered = True
            self.post("error", 0, err)
        for r in self.rows:
            r.abort()

    def group_key(self) -> tuple[Any, ...]:
        c = self.cfg
        if c.seed is not None:
            return ("seeded", id(self))  # a group of its own: see the module docstring
        if c.greedy:
            return ("greedy", c.top_logprobs)
        return ("sample", c.temperature, c.top_k, c.top_p, c.top_logprobs)


class BuiltinBackend:
    """The built-in decoder behind the `Backend` protocol."""

    name = "builtin"

    def __init__(
        self,
        model_name: str = "builtin",
        model_dir: Path | None = None,
        *,
        max_batch: int = 8,
        batch_wait_ms: float = 2.0,
        default_max_tokens: int = 256,
        threads: int | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_dir = model_dir
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self.default_max_tokens = default_max_tokens
        self.threads = threads
        self.model: Decoder | None = None
        self.tokenizer: Tokenizer | None = None
        self.weights_sha256: str | None = None
        self.fingerprint = ""
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        # Held while queueing jobs and while `aclose` flags the shutdown and queues its sentinel, so
        # that no job can land behind the sentinel, where the worker would never see it.
        self._lock = threading.Lock()
        self._closing = False
        self.batches = 0  # decoded batches, for tests and metrics
        self.rows_decoded = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._closing = False
        self._jobs = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name=f"steward-{self.model_name}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import torch

        from steward.model.io import default_model_dir, load_model, verify_manifest
        from steward.model.transformer import Decoder

        if self.threads:
            torch.set_num_threads(self.threads)
        directory = self.model_dir or default_model_dir()
        model, tokenizer = load_model(directory)
        if not isinstance(model, Decoder) or tokenizer is None:
            raise BackendError(f"{directory}: not a decoder with a tokenizer", status=500)
        model.eval()
        # Pack the weights for batched decoding now rather than at the first batch of several rows:
        # a seeded request's prefill (several rows) then runs the same kernels before and after.
        model.use_decoding_layout(self.max_batch)
        manifest = verify_manifest(directory)
        files = manifest.get("files", {})
        weights = sorted(
            (v["sha256"] if isinstance(v, dict) else v)
            for k, v in files.items()
            if str(k).endswith(".safetensors")
        )
        import hashlib

        self.weights_sha256 = (
            weights[0] if len(weights) == 1 else hashlib.sha256("".join(weights).encode()).hexdigest()
        )
        self.fingerprint = "fp_" + (self.weights_sha256 or "0" * 12)[:12]
        self.model, self.tokenizer = model, tokenizer

    async def aclose(self) -> None:
        """Refuse new requests (503), let the batch in progress finish, answer the queue with 503."""
        if self._thread is not None:
            with self._lock:
                self._closing = True
                self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    def models(self) -> list[ModelInfo]:
        ctx = self.model.config.max_positions if self.model is not None else None
        return [
            ModelInfo(
                id=self.model_name,
                backend="builtin",
                context_length=ctx,
                weights_sha256=self.weights_sha256,
            )
        ]

    # -- request preparation --------------------------------------------------------------------------
    def _tok(self) -> tuple[Decoder, Tokenizer]:
        if self.model is None or self.tokenizer is None:
            raise BackendError("the built-in model is not loaded", status=503, type="server_error")
        return self.model, self.tokenizer

    def _prompt_ids(self, route: Literal["chat", "completions"], call: Call) -> list[list[int]]:
        cached = call.metadata.get("_builtin_prompt_ids")
        if cached is not None:
            return list(cached)
        _, tok = self._tok()
        body = call.body
        if route == "chat":
            _check_fields(body, _CHAT_FIELDS)
            msgs = []
            for i, m in enumerate(body["messages"]):
                role = m.get("role")
                if role == "developer":
                    role = "system"
                if role not in ("system", "user", "assistant"):
                    raise unsupported(f"messages[{i}].role", f"role {role!r} (tools are not supported)")
                content = m.get("content")
                if isinstance(content, list):
                    texts = []
                    for j, part in enumerate(content):
                        if part.get("type") != "text":
                            raise unsupported(f"messages[{i}].content[{j}]", "only text parts")
                        texts.append(part.get("text") or "")
                    content = "".join(texts)
                if content is None:
                    content = ""
                msgs.append({"role": role, "content": content})
            # Contents are text: a "<|end|>" typed by a user must not end a turn (no forged turns).
            if tok.has_chat_template:
                ids = [tok.encode_chat(msgs)]
            else:
                ids = [tok.encode_text(tok.apply_chat_template(msgs))]
        else:
            _check_fields(body, _COMPLETION_FIELDS, _COMPLETION_DEFAULTS)
            n = body.get("n") or 1
            if body.get("best_of") == 1 and n > 1:
                raise BackendError(
                    f"best_of must be at least n ({n})",
                    status=400,
                    type="invalid_request_error",
                    param="best_of",
                    code="invalid_value",
                )
            prompts = body["prompt"]
            prompts = [prompts] if isinstance(prompts, str) else prompts
            ids = [tok.encode_text(p) for p in prompts]
            for i, p in enumerate(ids):
                if not p:
                    raise BackendError(
                        f"prompt {i} is empty", status=400, type="invalid_request_error", param="prompt"
                    )
        call.metadata["_builtin_prompt_ids"] = ids
        return ids

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        return sum(len(p) for p in self._prompt_ids(route, call))  # once for any n, as the usage counts it

    def max_new_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        """The completion budget the request will use: its own, else what the context leaves."""
        model, _ = self._tok()
        ctx = model.config.max_positions
        longest = max(len(p) for p in self._prompt_ids(route, call))
        asked = call.body.get("max_completion_tokens") or call.body.get("max_tokens")
        room = ctx - longest
        if room < 1:
            raise BackendError(
                f"this model's maximum context length is {ctx} tokens; the prompt has {longest}",
                status=400,
                type="invalid_request_error",
                code="context_length_exceeded",
                param="messages" if route == "chat" else "prompt",
            )
        if asked is None:
            return min(self.default_max_tokens, room)
        if asked > room:
            raise BackendError(
                f"this model's maximum context length is {ctx} tokens; you requested {longest + asked} "
                f"({longest} in the prompt, {asked} for the completion)",
                status=400,
                type="invalid_request_error",
                code="context_length_exceeded",
                param="max_completion_tokens" if call.body.get("max_completion_tokens") else "max_tokens",
            )
        return int(asked)

    def _config(self, route: Literal["chat", "completions"], call: Call) -> tuple[GenerationConfig, int]:
        from steward.model.generate import GenerationConfig, GenerationError

        b = call.body
        n = int(b.get("n") or 1)
        if n > MAX_N:
            raise BackendError(
                f"n must be at most {MAX_N} for the built-in model",
                status=400,
                type="invalid_request_error",
                param="n",
                code="invalid_value",
            )
        stop = b.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if route == "chat":
            want_lp = bool(b.get("logprobs"))
            top = int(b.get("top_logprobs") or 0)
            if top and not want_lp:
                raise BackendError(
                    "top_logprobs requires logprobs to be true",
                    status=400,
                    type="invalid_request_error",
                    param="top_logprobs",
                )
        else:
            lp = b.get("logprobs")
            want_lp = lp is not None
            top = int(lp or 0)
        temperature = b.get("temperature")
        seed = b.get("seed")
        cfg = GenerationConfig(
            max_new_tokens=self.max_new_tokens(route, call),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if b.get("top_p") is None else float(b["top_p"]),
            stop=stops,
            seed=seed % (2**63) if isinstance(seed, int) else None,
            logprobs=want_lp,
            top_logprobs=top,
        )
        try:
            cfg.validate()
        except GenerationError as exc:
            raise BackendError(
                str(exc),
                status=400,
                type="invalid_request_error",
                param=_param_of(str(exc), route, b),
                code="invalid_value",
            ) from None
        return cfg, n

    # -- scheduling -----------------------------------------------------------------------------------
    def _submit(self, route: Literal["chat", "completions"], call: Call, stream: bool) -> list[_Job]:
        prompts = self._prompt_ids(route, call)
        cfg, n = self._config(route, call)
        loop = asyncio.get_running_loop()
        jobs = [_Job(p, cfg, choice_seeds(cfg.seed, n), stream, loop, asyncio.Queue()) for p in prompts]
        with self._lock:
            if self._closing:
                raise _shutting_down()
            if self._thread is None:
                raise BackendError("the built-in model is not running", status=503, type="server_error")
            for job in jobs:
                self._jobs.put(job)
        return jobs

    def _worker(self) -> None:
        """Start batches from the queue and advance every running batch by one step in turn.

        Batches are not merged (a running batch keeps its rows), but a request that arrives while
        others decode starts its own batch at the next step instead of waiting for them to finish:
        its latency is that of its own length, times the number of batches sharing the worker.
        Total work is what running the batches one after another would cost. Merging a newcomer
        into a running unseeded batch (continuous batching proper) would also share its forward
        passes; it needs `run_rows` to accept rows between steps: prefill them in a cache of their
        own, left-pad the shorter of the two caches to a common length and concatenate (keys,
        values, `key_valid`, `valid_count`), and give the sampler a step counter per row.
        """
        import torch

        torch.set_grad_enabled(False)
        pending: list[_Job] = []
        running: list[tuple[list[_Job], Iterator[None]]] = []
        while True:
            if self._closing:
                # Whatever has not started is refused, consistently; what runs finishes below.
                # `_submit` queues nothing after the sentinel, so this reaches every waiting job.
                pending += self._take_queued(block=False)
                for j in pending:
                    j.fail(_shutting_down())
                pending = []
                if not running:
                    return
            elif not running:
                if not pending:
                    pending = self._take_queued(block=True)
                    if not pending:
                        continue  # the sentinel: `_closing` is set
                # Idle: let a burst of concurrent requests arrive before deciding the batch (not
                # for a seeded request, which is decoded alone whatever arrives).
                if pending[0].cfg.seed is None:
                    self._gather_burst(pending)
            else:
                pending += self._take_queued(block=False)
            if self._closing and pending:
                continue  # aclose() began while gathering: refuse these at the top
            in_flight = sum(len(j.seeds) for group, _ in running for j in group)
            while pending and (not running or in_flight < _RUNNING_BATCHES * self.max_batch):
                group, pending = self._next_group(pending)
                running.append((group, self._decode(group)))
                in_flight += sum(len(j.seeds) for j in group)
            for entry in list(running):
                group, steps = entry
                try:
                    next(steps)
                except StopIteration:
                    running.remove(entry)
                except Exception as exc:  # never let the worker die: later requests would wait forever
                    running.remove(entry)
                    for j in group:
                        j.fail(_failed(exc))

    def _take_queued(self, block: bool) -> list[_Job]:
        """The jobs in the queue now (with `block`, wait for at least one item first)."""
        out: list[_Job] = []
        while True:
            try:
                job = self._jobs.get() if block and not out else self._jobs.get_nowait()
            except queue.Empty:
                return out
            if job is None:  # the sentinel; `_closing` is already set
                return out
            out.append(job)

    def _gather_burst(self, pending: list[_Job]) -> None:
        deadline = time.monotonic() + self.batch_wait
        rows = sum(len(j.seeds) for j in pending)
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                return
            pending.append(job)
            rows += len(job.seeds)

    def _next_group(self, pending: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """The first job's sampling group, up to `max_batch` rows, and the jobs left over."""
        key = pending[0].group_key()
        group: list[_Job] = []
        rest: list[_Job] = []
        used = 0
        for j in pending:
            if j.group_key() == key and (not group or used + len(j.seeds) <= self.max_batch):
                group.append(j)
                used += len(j.seeds)
            else:
                rest.append(j)
        return group, rest

    def _decode(self, jobs: list[_Job]) -> Iterator[None]:
        """Decode a group, one step per `next()`: a seeded job row by row alone, others together
        (see the module docstring); after a failed forward pass, retry alone each request that
        can be retried."""
        live = [j for j in jobs if not j.cancelled]
        if not live:
            return
        for j in live:
            j.rows = self._new_rows(j)
        if len(live) == 1 and live[0].cfg.seed is not None:
            job = live[0]
            for i in range(len(job.seeds)):
                if job.cancelled or job.answered:
                    break
                try:
                    yield from self._run_batch([job], [(job, i)])
                except Exception as exc:  # decoded alone already: the failure is this job's own
                    job.fail(_failed(exc))
            return
        try:
            yield from self._run_batch(live, [(j, i) for j in live for i in range(len(j.seeds))])
            return
        except Exception as exc:
            first = exc
        for j in live:
            if j.answered or j.cancelled:
                continue
            if j.sent:  # a stream cannot take back what it sent: only this one ends with the error
                j.fail(_failed(first))
                continue
            try:
                j.rows = self._new_rows(j)
                yield from self._run_batch([j], [(j, i) for i in range(len(j.seeds))])
            except Exception as exc:
                j.fail(_failed(exc))

    def _new_rows(self, job: _Job) -> list[Row]:
        from steward.model.generate import make_row

        model, tok = self._tok()
        return [make_row(model, tok, len(job.prompt), job.cfg) for _ in job.seeds]

    def _run_batch(self, jobs: list[_Job], rows: list[tuple[_Job, int]]) -> Iterator[None]:
        """Decode the given rows (job, choice index) as one batch, one step per `next()`,
        answering each job as soon as all its rows are finished. Raises when the forward pass
        fails; a failure in one job's own bookkeeping fails that job only."""
        from dataclasses import replace

        from steward.model import generate

        model, tok = self._tok()
        cfg = replace(
            jobs[0].cfg,
            max_new_tokens=max(j.cfg.max_new_tokens for j in jobs),
            logprobs=any(j.cfg.logprobs for j in jobs),
            stop=[],
        )
        self.batches += 1
        self.rows_decoded += len(rows)
        steps = generate.run_rows(
            model,
            tok,
            [j.prompt for j, _ in rows],
            [j.rows[i] for j, i in rows],
            cfg,
            [j.seeds[i] for j, i in rows],
        )
        for _ in steps:
            for j in jobs:
                self._after_step(j)
            yield
        for j in jobs:  # rows ended before the first step (a job cancelled meanwhile)
            self._after_step(j)

    def _after_step(self, job: _Job) -> None:
        """Post what a step produced for `job`: deltas, its answer once every row is finished, or
        its error when one of its rows failed."""
        if job.answered:
            return
        try:
            if job.cancelled:
                job.answered = True  # nobody is listening any more
                for r in job.rows:
                    r.abort()
                return
            for r in job.rows:
                if r.error is not None:
                    raise r.error
            if job.stream:
                for i, r in enumerate(job.rows):
                    d = r.take_delta()
                    if d is not None:
                        job.post("delta", i, d)
                        job.sent = True
            if all(r.finish is not None for r in job.rows):
                done = None if job.stream else [r.completion() for r in job.rows]
                job.answered = True
                job.post("end" if done is None else "done", 0, done)
        except Exception as exc:
            job.fail(_failed(exc))

    # -- protocol -------------------------------------------------------------------------------------
    def _ids(self, kind: str, request_id: str) -> str:
        return f"{kind}-{request_id or uuid.uuid4().hex}"

    async def _wait(self, job: _Job) -> list[Any]:
        try:
            kind, _, payload = await job.out.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if kind == "error":
            raise payload
        return list(payload)

    async def chat(self, call: Call) -> JSON:
        jobs = self._submit("chat", call, stream=False)
        comps = await self._wait(jobs[0])
        choices = []
        for i, c in enumerate(comps):
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": self._chat_logprobs(c.logprobs) if jobs[0].cfg.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
            )
        prompt = comps[0].prompt_tokens
        completion = sum(c.completion_tokens for c in comps)
        return {
            "id": self._ids("chatcmpl", call.request_id),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": _usage(prompt, completion),
        }

    async def completion(self, call: Call) -> JSON:
        jobs = self._submit("completions", call, stream=False)
        choices = []
        prompt = completion = 0
        try:
            results = [await self._wait(j) for j in jobs]
        except BaseException:
            for j in jobs:
                j.cancelled = True
            raise
        for p, (job, comps) in enumerate(zip(jobs, results, strict=True)):
            prompt += comps[0].prompt_tokens
            for k, c in enumerate(comps):
                choices.append(
                    {
                        "index": p * len(comps) + k,
                        "text": c.text,
                        "logprobs": self._completion_logprobs(c.logprobs) if job.cfg.logprobs else None,
                        "finish_reason": c.finish_reason,
                    }
                )
                completion += c.completion_tokens
        return {
            "id": self._ids("cmpl", call.request_id),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
            "usage": _usage(prompt, completion),
        }

    def chat_stream(self, call: Call) -> AsyncIterator[JSON]:
        jobs = self._submit("chat", call, stream=True)  # errors surface here, before any byte is sent
        return self._stream("chat", call, jobs)

    def completion_stream(self, call: Call) -> AsyncIterator[JSON]:
        jobs = self._submit("completions", call, stream=True)
        return self._stream("completions", call, jobs)

    async def _stream(self, route: str, call: Call, jobs: list[_Job]) -> AsyncIterator[JSON]:
        chat = route == "chat"
        rid = self._ids("chatcmpl" if chat else "cmpl", call.request_id)
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        n = len(jobs[0].seeds)
        completion: dict[tuple[int, int], int] = {}
        prompt = 0

        def chunk(choices: list[JSON]) -> JSON:
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.model_name,
                "system_fingerprint": self.fingerprint,
                "choices": choices,
            }

        try:
            if chat:
                yield chunk(
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for i in range(n)
                    ]
                )
            for p, job in enumerate(jobs):
                prompt += len(job.prompt)
                while True:
                    kind, i, payload = await job.out.get()
                    if kind == "error":
                        raise payload
                    if kind == "end":
                        break
                    d: Delta = payload
                    completion[(p, i)] = d.completion_tokens
                    index = p * n + i
                    if chat:
                        choice: JSON = {
                            "index": index,
                            "delta": {"content": d.text} if d.text or not d.finish_reason else {},
                            "logprobs": self._chat_logprobs(d.logprobs) if job.cfg.logprobs else None,
                            "finish_reason": d.finish_reason,
                        }
                    else:
                        choice = {
                            "index": index,
                            "text": d.text,
                            "logprobs": self._completion_logprobs(d.logprobs) if job.cfg.logprobs else None,
                            "finish_reason": d.finish_reason,
                        }
                    yield chunk([choice])
            final = chunk([])
            final["usage"] = _usage(prompt, sum(completion.values()))
            yield final
        finally:
            for j in jobs:
                j.cancelled = True

    async def embeddings(self, call: Call) -> JSON:
        raise BackendError(
            f"model {self.model_name!r} does not serve embeddings",
            status=400,
            param="model",
            code="model_not_found",
        )

    # -- logprob views --------------------------------------------------------------------------------
    @staticmethod
    def _chat_logprobs(lps: list[TokenLogprob] | None) -> JSON:
        # `bytes` are the token's own bytes, so those of a character split across tokens add up to it.
        def entry(t: TokenLogprob | TopLogprob) -> JSON:
            return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}

        return {
            "content": [
                {**entry(t), "top_logprobs": [entry(a) for a in t.top_logprobs]} for t in (lps or [])
            ],
            "refusal": None,
        }

    @staticmethod
    def _completion_logprobs(lps: list[TokenLogprob] | None) -> JSON:
        # Offsets count characters from the start of the completion, across stream chunks.
        tokens, values, tops, offsets = [], [], [], []
        for t in lps or []:
            tokens.append(_completion_token(t))
            values.append(t.logprob)
            tops.append({_completion_token(a): a.logprob for a in t.top_logprobs})
            offsets.append(t.text_offset)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _completion_token(t: TokenLogprob | TopLogprob) -> str:
    """A token as the completions API names it: its text, or "bytes:\\xNN..." when its bytes are
    not whole characters on their own."""
    try:
        t.bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in t.bytes)
    return t.token


def _param_of(message: str, route: str, body: JSON) -> str | None:
    """The request field a `GenerationError` is about (its message starts with the config's name)."""
    m = re.match(r"[a-z_]+", message)
    name = m.group(0) if m else ""
    if name == "max_new_tokens":
        return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if name == "top_logprobs" and route != "chat":
        return "logprobs"
    if name in ("temperature", "top_p", "top_k", "stop", "seed", "logprobs", "top_logprobs"):
        return name
    return None


def _shutting_down() -> BackendError:
    return BackendError("server shutting down", status=503, type="server_error")


def _failed(exc: BaseException) -> BackendError:
    return BackendError(f"generation failed: {type(exc).__name__}", status=500, type="server_error")


def _usage(prompt: int, completion: int) -> JSON:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EncoderBackend:
    """Sentence embeddings from the MiniLM encoder (`/v1/embeddings`)."""

    name = "builtin"

    def __init__(self, model_name: str = "all-minilm-l6-v2", model_dir: Path | None = None) -> None:
        self.model_name = model_name
        self.model_dir = model_dir
        self.encoder: SentenceEncoder | None = None
        self.weights_sha256: str | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="steward-encoder")

    async def start(self) -> None:
        if self.encoder is None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        from steward.model.embedding import SentenceEncoder
        from steward.model.io import sha256_file

        enc = SentenceEncoder(self.model_dir)
        files = sorted(enc.directory.glob("*.safetensors"))
        self.weights_sha256 = sha256_file(files[0]) if files else None
        self.encoder = enc

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False)

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=self.model_name,
                backend="builtin",
                context_length=self.encoder.max_seq_length if self.encoder else None,
                weights_sha256=self.weights_sha256,
                capabilities=frozenset({"embeddings"}),
            )
        ]

    def count_prompt_tokens(self, route: Literal["chat", "completions"], call: Call) -> int:
        inputs = call.body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if self.encoder is None:
            return sum(len(t.encode()) for t in texts)
        return sum(len(r) for r in self.encoder._token_ids(texts))

    async def chat(self, call: Call) -> JSON:
        raise self._not_chat()

    async def completion(self, call: Call) -> JSON:
        raise self._not_chat()

    def chat_stream(self, call: Call) -> AsyncIterator[JSON]:
        raise self._not_chat()

    def completion_stream(self, call: Call) -> AsyncIterator[JSON]:
        raise self._not_chat()

    def _not_chat(self) -> BackendError:
        return BackendError(
            f"model {self.model_name!r} is an embedding model; it does not generate text",
            status=400,
            param="model",
            type="invalid_request_error",
            code="model_not_supported",
        )

    def _encode_whole(self, texts: list[str], single: bool) -> Any:
        """The texts' vectors, each from the whole text. The encoder itself cuts a text to its
        window; here a text over the window is refused instead (OpenAI's 400 for an input over the
        model's context length), naming the input and its length, since a cut text's vector says
        nothing of its end and the client could not tell."""
        enc = self.encoder
        assert enc is not None
        inner = enc.tokenizer.inner
        encode = getattr(inner, "encode_batch_fast", inner.encode_batch)
        window = enc.max_seq_length
        for i, e in enumerate(encode(texts, add_special_tokens=False)):
            n = len(e.ids) + 2  # and [CLS], [SEP]: counted as usage counts them
            if n > window:
                where = "input" if single else f"input[{i}]"
                raise BackendError(
                    f"{where} has {n} tokens; {self.model_name} takes at most {window} tokens per "
                    "input: shorten or split it",
                    status=400,
                    param="input",
                    type="invalid_request_error",
                    code="context_length_exceeded",
                )
        return enc.encode(texts)

    async def embeddings(self, call: Call) -> JSON:
        import base64

        import numpy as np

        enc = self.encoder
        if enc is None:
            raise BackendError("the encoder is not loaded", status=503, type="server_error")
        b = call.body
        for name in b:
            if (
                name not in ("model", "input", "encoding_format", "dimensions", "user")
                and b[name] is not None
            ):
                raise unsupported(name)
        inputs = b["input"]
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        dims = b.get("dimensions")
        if dims is not None and dims != enc.dim:
            # The client's choice, not the upstream's failure: OpenAI's type and a code for it.
            raise BackendError(
                f"dimensions must be {enc.dim} for {self.model_name}",
                status=400,
                param="dimensions",
                type="invalid_request_error",
                code="invalid_value",
            )
        for i, t in enumerate(texts):
            if not t:
                # OpenAI refuses it; its vector would be the encoder's [CLS][SEP] alone.
                where = "input" if isinstance(inputs, str) else f"input[{i}]"
                raise BackendError(
                    f"{where} is an empty string; every input must hold text",
                    status=400,
                    param="input",
                    type="invalid_request_error",
                    code="invalid_value",
                )
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._pool, self._encode_whole, texts, isinstance(inputs, str))
        tokens = self.count_prompt_tokens("chat", call)
        data = []
        for i, v in enumerate(vectors):
            if b.get("encoding_format") == "base64":
                emb: Any = base64.b64encode(v.numpy().astype(np.float32).tobytes()).decode()
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": self.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
