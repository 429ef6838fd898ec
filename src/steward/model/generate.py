"""Text generation for the decoder: greedy and sampled decoding, stop sequences, logprobs, streaming.

Design choices and the reasons for them:

* One prefill, then one token per step through the preallocated `KVCache`, with the LM head applied
  to the last position only: a decoding step then reads each weight once, which is what bounds
  batch-1 speed. Everything per step that is not the model (sampling, detokenising, stop checks) is
  a few vectorised tensor ops and O(1) host work per row.
* Prompts of a batch are LEFT-padded, so every row's next-token logits sit in the last column; the
  decoder derives position ids from the attention mask and the cache remembers which key columns are
  padding, so a padded row computes the same numbers as the row alone.
* Sampling is by inverse CDF with one uniform number per row and step, drawn up front from that
  row's own `torch.Generator` seeded with the request's seed. Each row consumes exactly its own
  stream, one number per token whatever the batch holds, and rows finishing early do not shift
  anybody's randomness. That makes the randomness independent of the batch, not the logits: a
  row's forward pass differs in the last digits with the batch's size and padding (other GEMM
  kernels, other reduction shapes), and a uniform near a CDF boundary then picks a neighbouring
  token. Exact repeatability needs the same computation, i.e. decoding the row alone, which is
  what the serving backend does for a seeded request (`steward.backends.builtin`).
* Text is detokenised incrementally over a small sliding window of tokens (never re-decoding the whole
  completion). While the window ends in U+FFFD its last character is held back, as it may be a UTF-8
  sequence still missing bytes, so no delta ever shows a half character. `generate` and `stream`
  share this code, so the concatenated stream equals the non-streamed text by construction.
* Stop sequences are matched on text, so they may span tokens; a streamed delta withholds any tail
  that could still become a stop sequence until the next tokens decide.
* Logprobs are those of the model's raw distribution (log-softmax of the logits, before temperature,
  top-k or top-p), as vLLM reports them by default: they describe the model, not the sampler, so
  at a temperature other than 1 or with top_p < 1 they are not log q(token) of the distribution
  the token was actually drawn from (a deliberate choice; `_run` would renormalise after the
  temperature and the nucleus mask to report that one instead). Each
  carries the token's own bytes (a token may hold part of a UTF-8 character) and its offset in the
  completion's text.
* A temperature so small that the scaled logits overflow float32 (1e-38 and below) decodes that
  row greedily, the limit of sampling as the temperature goes to 0, instead of sampling from NaNs.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import torch

from .tokenizer import END, Tokenizer
from .transformer import Decoder

FinishReason = Literal["stop", "length"]

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20


class GenerationError(ValueError):
    """A generation request that cannot be served (bad parameter, prompt too long, ...)."""


@dataclass
class GenerationConfig:
    """Decoding parameters of one request; the defaults mirror the OpenAI API's."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise GenerationError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, list | tuple):
            raise GenerationError(f"stop must be a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise GenerationError(f"stop allows at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop[{i}] must be a non-empty string, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise GenerationError(f"stop[{i}] is {len(s)} characters long; the limit is {MAX_STOP_CHARS}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise GenerationError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.logprobs, bool):
            raise GenerationError(f"logprobs must be true or false, got {self.logprobs!r}")
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise GenerationError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}"
            )
        if self.top_logprobs and not self.logprobs:
            raise GenerationError("top_logprobs requires logprobs=True")


@dataclass(frozen=True)
class TopLogprob:
    token: str
    id: int
    logprob: float
    bytes: bytes = b""  # the token's own bytes (`token` shows U+FFFD for part of a character)


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, with the most likely alternatives.

    `bytes` are the token's own bytes: a token holding part of a UTF-8 character has `token` U+FFFD,
    but the `bytes` of consecutive tokens concatenate to the text. `text_offset` is the position in
    the completion's text (in characters) of the character that the token's first byte belongs to.
    """

    token: str
    id: int
    logprob: float
    top_logprobs: list[TopLogprob]
    bytes: bytes = b""
    text_offset: int = 0


@dataclass
class Completion:
    """One finished completion.

    `token_ids` (and `logprobs`, aligned with it) hold the generated tokens except a final end-of-text
    token; `completion_tokens` counts every token the model produced, that one included, because it
    is the cost of the request. A stop sequence is cut from `text` but its tokens stay in `token_ids`.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Delta:
    """A piece of a streamed completion; the last one has `finish_reason` set.

    `token_ids`/`logprobs` are the tokens produced since the previous delta, whose text may be (partly)
    held back in a later delta while it could still be the start of a stop sequence or of an
    unfinished UTF-8 character. Token counts are running totals.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


def stop_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """End-of-text, plus the chat template's end-of-turn token: after it the model would write the
    next turn itself, which is never part of the answer."""
    ids: set[int] = set()
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    if tokenizer.has_chat_template:
        end = tokenizer.token_to_id(END)
        if end is not None:
            ids.add(end)
    return frozenset(ids)


class _Row:
    """Per-sequence bookkeeping: tokens, incremental detokenisation, stop sequences, deltas."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_tokens: int,
        budget: int,
        stops: Sequence[str],
        stop_ids: frozenset[int],
        want_logprobs: bool,
    ) -> None:
        self.tok = tokenizer
        self.prompt_tokens = prompt_tokens
        self.budget = budget
        self.stops = tuple(stops)
        self.max_stop = max((len(s) for s in stops), default=0)
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if want_logprobs else None
        self.sampled = 0
        self.text = ""
        self.finish: FinishReason | None = None
        # Sliding detokenisation window: ids[prefix:read] decode to `prefix_text`; decoding
        # ids[prefix:] and diffing against it yields the new characters, with whatever left context
        # the tokenizer's decoder needs (e.g. leading-space rules) on both sides. `_done` counts the
        # characters after `prefix_text` already appended while the window still ended in U+FFFD.
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._done = 0
        self._emitted = 0
        self._delta_from = 0
        self._final_sent = False
        self.error: Exception | None = None  # why `abort` ended the row, for its owner to report

    def abort(self, error: Exception | None = None) -> None:
        """End the row without touching its text (which may be what failed), so that the batch
        drops it at the next step; `error` tells the row's owner why, when it is a failure."""
        if error is not None and self.error is None:
            self.error = error
        if self.finish is None:
            self.finish = "stop"

    def add(self, token: int, logprob: TokenLogprob | None) -> None:
        self.sampled += 1
        if token in self.stop_ids:
            self.end("stop")
            return
        if self.logprobs is not None and logprob is not None:
            # Characters before this token that are complete: the text held back for an unfinished
            # character is not in `text` yet, so a token continuing a character points at its start.
            self.logprobs.append(replace(logprob, text_offset=len(self.text)))
        self.ids.append(token)
        window = self.tok.decode(self.ids[self._prefix :])
        base = len(self._prefix_text) + self._done
        if window.endswith("\ufffd"):
            # The last character may be a UTF-8 sequence still missing bytes: hold it back. All
            # before it is final (lossy UTF-8 decoding only ever re-reads an unfinished tail), so
            # even a stream of invalid bytes keeps flowing instead of waiting for the end.
            if len(window) - 1 > base:
                self._append(window[base:-1])
                self._done += len(window) - 1 - base
        elif len(window) > base:
            self._append(window[base:])
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self.tok.decode(self.ids[self._prefix : self._read])
            self._done = 0
        if self.finish is None and self.sampled >= self.budget:
            self.end("length")

    def end(self, reason: FinishReason) -> None:
        if self.finish is not None:
            return
        self.finish = reason
        # Release what was held for an unfinished character: the full decode renders it as U+FFFD.
        window = self.tok.decode(self.ids[self._prefix :])
        base = len(self._prefix_text) + self._done
        if len(window) > base:
            self._append(window[base:])

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        if not self.stops:
            return
        cut = -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish = "stop"

    def _holdback(self) -> int:
        """Characters at the end of `text` that could still grow into a stop sequence."""
        if not self.text:
            return 0
        last = self.text[-1]
        held = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if s[k - 1] == last and self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def take_delta(self) -> Delta | None:
        """What can be shown now; None while nothing new can be released.

        The delta with `finish_reason` is returned once; after it there is nothing more to take.
        """
        if self._final_sent:
            return None
        end = len(self.text) if self.finish else len(self.text) - self._holdback()
        end = max(end, self._emitted)
        if end == self._emitted and self.finish is None:
            return None
        text = self.text[self._emitted : end]
        self._emitted = end
        ids = self.ids[self._delta_from :]
        lps = self.logprobs[self._delta_from :] if self.logprobs is not None else None
        self._delta_from = len(self.ids)
        self._final_sent = self.finish is not None
        return Delta(text, ids, self.finish, self.prompt_tokens, self.sampled, lps)

    def completion(self) -> Completion:
        assert self.finish is not None
        return Completion(self.text, self.ids, self.finish, self.prompt_tokens, self.sampled, self.logprobs)


def _prepare(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    cfg: GenerationConfig | None,
) -> tuple[list[list[int]], GenerationConfig]:
    cfg = cfg if cfg is not None else GenerationConfig()
    cfg.validate()
    if getattr(getattr(model, "config", None), "arch", None) != "decoder":
        raise GenerationError("generation needs a decoder model")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a non-empty list of strings or token-id lists")
    ctx = model.config.max_positions
    vocab = model.config.vocab_size
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {i}"
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        else:
            if not isinstance(p, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in p
            ):
                raise GenerationError(f"{name} must be a string or a list of token ids")
            ids = list(cast(Sequence[int], p))
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise GenerationError(
                    f"{name}: token id {bad[0]} is outside the model's vocabulary of {vocab}"
                )
        if not ids:
            raise GenerationError(f"{name} is empty")
        if len(ids) >= ctx:
            raise GenerationError(
                f"{name} is {len(ids)} tokens long but the model's context is {ctx} tokens; "
                f"the prompt must be shorter than the context to leave room for the completion"
            )
        out.append(ids)
    return out, cfg


def _token_info(tokenizer: Tokenizer, memo: dict[int, tuple[str, bytes]], idx: int) -> tuple[str, bytes]:
    """A token's text as the API shows it (U+FFFD for part of a character) and its own bytes."""
    s = memo.get(idx)
    if s is None:
        s = memo[idx] = (tokenizer.decode([idx], skip_special_tokens=False), tokenizer.token_bytes(idx))
    return s


def _top(tokenizer: Tokenizer, memo: dict[int, tuple[str, bytes]], idx: int, logprob: float) -> TopLogprob:
    name, raw = _token_info(tokenizer, memo, idx)
    return TopLogprob(name, idx, logprob, raw)


_UNIFORM_BLOCK = 64  # uniforms are drawn per row in blocks of this size (see _Sampler)
_NUCLEUS_FAST_K = 256  # top-p looks for the nucleus among this many tokens before sorting them all


class _Sampler:
    """Turns a step's logits [b, V] into next tokens by inverse-CDF sampling.

    Each row owns a `torch.Generator` seeded with its request's seed and draws its uniforms up front,
    one per step, in fixed-size blocks: the n-th token of a row always uses the n-th number of its
    own stream, whatever the batch holds, whichever rows finish, and whatever `max_new_tokens` is
    (a longer request continues a shorter one). One uniform per step, against the V exponentials of
    a Gumbel race, because drawing V random numbers each step costs more than the sampling math
    (about 1.7 ms for GPT-2's 50k vocabulary on one CPU core, against 0.1 ms for softmax + cumsum).
    Generators live on the CPU so that a seed means the same stream on every device.
    """

    def __init__(
        self,
        cfg: GenerationConfig,
        vocab: int,
        seeds: Sequence[int],
        device: torch.device,
        steps: int | None = None,
    ) -> None:
        """`steps`: the most tokens any row can sample (its budget, bounded by the context); the
        uniforms are drawn for that many, not for `max_new_tokens`, which may be 10**20."""
        self.cfg = cfg
        self.vocab = vocab
        self.top_k = min(cfg.top_k, vocab) if cfg.top_k > 0 else 0
        self.uniforms: torch.Tensor | None = None
        if not cfg.greedy:
            n = cfg.max_new_tokens if steps is None else min(cfg.max_new_tokens, steps)
            blocks = -(-max(n, 1) // _UNIFORM_BLOCK)
            rows = []
            for seed in seeds:
                g = torch.Generator().manual_seed(seed)
                rows.append(
                    torch.cat(
                        [torch.rand(_UNIFORM_BLOCK, generator=g, dtype=torch.float64) for _ in range(blocks)]
                    )
                )
            self.uniforms = torch.stack(rows).to(device)

    def keep(self, rows: torch.Tensor) -> None:
        if self.uniforms is not None:
            self.uniforms = self.uniforms.index_select(0, rows)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Sample token `step` of every row; may overwrite `logits`."""
        cfg = self.cfg
        if cfg.greedy:
            return logits.argmax(-1)
        greedy: torch.Tensor | None = None
        if cfg.temperature < 1.0:
            # A temperature below 1 can scale finite logits past float32's range (1e-38 does for a
            # logit of 4): the softmax is then NaN and the "sample" garbage. Such a row is decoded
            # greedily, the limit of sampling as the temperature goes to 0; other rows are untouched.
            greedy = logits.argmax(-1)
        x = logits.div_(cfg.temperature)
        overflow = None if greedy is None else ~torch.isfinite(x.amax(-1))
        index: torch.Tensor | None = None
        if self.top_k:
            x, index = torch.topk(x, self.top_k, dim=-1)
            probs = torch.softmax(x, dim=-1)
        elif cfg.top_p < 1.0:
            # The nucleus needs the tokens in order of probability; a full sort of a 50k vocabulary
            # costs milliseconds, so first try whether the top few hundred already hold top_p.
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            k = min(_NUCLEUS_FAST_K, self.vocab)
            x_top, index = torch.topk(x, k, dim=-1)
            probs = (x_top - lse).exp_()
            if k < self.vocab and not bool((probs.sum(-1) >= cfg.top_p).all()):
                x_top, index = torch.sort(x, dim=-1, descending=True)
                probs = (x_top - lse).exp_()
        else:
            probs = torch.softmax(x, dim=-1)
        if cfg.top_p < 1.0:
            # Keep the most likely tokens until their mass reaches top_p; the first always stays,
            # as the mass before it is 0.
            before = probs.cumsum(-1).sub_(probs)
            probs = probs.masked_fill_(before >= cfg.top_p, 0.0)
        # Inverse CDF in float64: float32 partial sums over 50k terms would misplace the rare tokens.
        cdf = probs.to(torch.float64).cumsum_(-1)
        assert self.uniforms is not None
        target = self.uniforms[:, step : step + 1] * cdf[:, -1:]
        choice = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        out = choice.squeeze(1) if index is None else index.gather(1, choice).squeeze(1)
        if overflow is not None and greedy is not None:
            out = torch.where(overflow, greedy, out)
        return out


@torch.inference_mode()
def _run(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    rows: list[_Row],
    cfg: GenerationConfig,
    seeds: Sequence[int],
) -> Generator[list[_Row], None, None]:
    """Decode all prompts together; after every step yield the rows that are still in the batch."""
    mc = model.config
    ctx = mc.max_positions
    device = model.embed.token.weight.device  # not the LM head: a quantised one has no float weight
    B = len(prompts)
    P = max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = True
    ids, mask = ids.to(device), mask.to(device)
    # The last sampled token of a row is never fed back, hence the -1.
    capacity = min(P + max(r.budget for r in rows) - 1, ctx)
    cache = model.new_cache(B, max(capacity, P))
    sampler = _Sampler(cfg, mc.vocab_size, seeds, device, steps=max(r.budget for r in rows))
    memo: dict[int, tuple[str, bytes]] = {}
    n_top = cfg.top_logprobs
    order = list(range(B))  # batch position -> row index

    was_training = model.training
    model.eval()
    try:
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
        for step in itertools.count():
            live = [rows[r] for r in order]
            alive = [r.finish is None for r in live]
            logits = logits.float()
            lp = torch.log_softmax(logits, dim=-1) if cfg.logprobs else None
            tok = sampler(logits, step)
            toks: list[int] = tok.tolist()
            chosen: list[float] = []
            top_v: list[list[float]] = []
            top_i: list[list[int]] = []
            if lp is not None:
                chosen = lp.gather(1, tok[:, None]).squeeze(1).tolist()
                if n_top:
                    tv, ti = torch.topk(lp, n_top, dim=-1)
                    top_v, top_i = tv.tolist(), ti.tolist()
            for j, row in enumerate(live):
                if not alive[j]:
                    continue
                info = None
                if lp is not None:
                    alts = (
                        [_top(tokenizer, memo, t, v) for t, v in zip(top_i[j], top_v[j], strict=True)]
                        if n_top
                        else []
                    )
                    name, raw = _token_info(tokenizer, memo, toks[j])
                    info = TokenLogprob(name, toks[j], chosen[j], alts, raw)
                try:
                    row.add(toks[j], info)
                except Exception as exc:  # this row's bookkeeping failed: end it, not the batch
                    row.abort(exc)
            yield live
            done = [row.finish is not None for row in live]
            n_done = sum(done)
            if n_done == len(live):
                return
            # Drop finished rows once they are a quarter of the batch (the copy then pays for
            # itself), and always when the padded length reaches the context: the shared padding
            # of the remaining rows is then squeezed out.
            if n_done and (4 * n_done >= len(live) or cache.length >= ctx):
                keep = [j for j in range(len(live)) if not done[j]]
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                cache.compact(keep_t)
                sampler.keep(keep_t)
                order = [order[j] for j in keep]
                tok = tok.index_select(0, keep_t)
            logits = model(tok[:, None], cache=cache, last_only=True)[:, -1]
    finally:
        if was_training:
            model.train()


def _seeds(cfg: GenerationConfig, n: int) -> list[int]:
    if cfg.seed is not None:
        return [cfg.seed] * n
    return [secrets.randbits(63) for _ in range(n)]


def _rows(
    model: Decoder, tokenizer: Tokenizer, prompts: list[list[int]], cfg: GenerationConfig
) -> list[_Row]:
    ctx = model.config.max_positions
    stop_ids = stop_token_ids(tokenizer)
    return [
        _Row(
            tokenizer,
            len(p),
            min(cfg.max_new_tokens, ctx - len(p)),
            cfg.stop,
            stop_ids,
            cfg.logprobs,
        )
        for p in prompts
    ]


def generate(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
) -> list[Completion]:
    """Complete every prompt (text, or token ids used as they are), batched.

    Every row samples with `cfg.seed` from its own stream; `seeds` gives rows their own seeds
    instead (e.g. several samples of one prompt). The same prompts, seeds and batch give the same
    completions; another batch may change a row's logits in the last digits and so, rarely, its
    tokens (see the module docstring): decode a prompt alone when it must be exactly repeatable.
    """
    ids, cfg = _prepare(model, tokenizer, prompts, cfg)
    if seeds is not None:
        if len(seeds) != len(ids):
            raise GenerationError(f"got {len(seeds)} seeds for {len(ids)} prompts")
        for i, s in enumerate(seeds):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
                raise GenerationError(f"seeds[{i}] must be an integer in [0, 2**63), got {s!r}")
    rows = _rows(model, tokenizer, ids, cfg)
    for _ in _run(model, tokenizer, ids, rows, cfg, list(seeds) if seeds else _seeds(cfg, len(ids))):
        pass
    for r in rows:
        if r.error is not None:  # no quietly truncated completion for a row that failed
            raise r.error
    return [r.completion() for r in rows]


def stream(
    model: Decoder,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    cfg: GenerationConfig | None = None,
) -> Iterator[Delta]:
    """Stream one completion as text deltas; the last delta carries the finish reason.

    Parameters and the prompt are checked here, before the first `next()`, so a bad request fails
    where it is made rather than wherever the iterator is first consumed.
    """
    ids, cfg = _prepare(model, tokenizer, [prompt], cfg)
    rows = _rows(model, tokenizer, ids, cfg)
    return _deltas(_run(model, tokenizer, ids, rows, cfg, _seeds(cfg, 1)), rows[0])


def _deltas(steps: Generator[list[_Row], None, None], row: _Row) -> Iterator[Delta]:
    try:
        for _ in steps:
            if row.error is not None:
                raise row.error
            delta = row.take_delta()
            if delta is not None:
                yield delta
    finally:
        steps.close()


# --- for schedulers that batch requests themselves (the gateway's batching worker) ------------------

Row = _Row


def make_row(model: Decoder, tokenizer: Tokenizer, prompt_tokens: int, cfg: GenerationConfig) -> Row:
    """Bookkeeping for one sequence with its own budget and stop strings (`cfg` already validated)."""
    budget = min(cfg.max_new_tokens, model.config.max_positions - prompt_tokens)
    return _Row(tokenizer, prompt_tokens, budget, cfg.stop, stop_token_ids(tokenizer), cfg.logprobs)


def run_rows(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    rows: list[Row],
    cfg: GenerationConfig,
    seeds: Sequence[int],
) -> Generator[list[Row], None, None]:
    """Decode rows that share sampling parameters (`cfg`; its `max_new_tokens` must cover the largest
    row budget); yields after every step. Ending a row (`row.end(...)` or `row.abort()`) from
    outside drops it. A row whose own bookkeeping raises is aborted with the exception in
    `row.error` and the others go on; an exception out of this generator is the batch's (the forward
    pass), and leaves every row where it was."""
    return _run(model, tokenizer, prompts, rows, cfg, seeds)
