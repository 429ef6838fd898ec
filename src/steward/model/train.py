"""`steward train CONFIG`: reproducible decoder training with exact resume and torchrun DDP.

Reproducibility by construction rather than by saved iterator state: the token windows of micro-batch
m at step s on rank r are drawn from a generator keyed by (seed, s, m * world + r), so the batch at
any step is a pure function of the config. Resuming from a checkpoint at step k therefore replays the
same batches an uninterrupted run would have seen, and with the model, optimizer and torch RNG state
restored the loss curve is identical. The same keying makes `world=2, grad_accum=1` see exactly the
windows of `world=1, grad_accum=2`, which the DDP test uses to check gradient averaging.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import TransformerConfig
from .data import Document, PreparedData, prepare, write_data_card
from .io import save_model, sha256_file
from .tokenizer import EOS, Tokenizer, train_bpe
from .transformer import Decoder


class TrainConfigError(ValueError):
    pass


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus_dir: str
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = 1234
    vocab_size: int = Field(8192, ge=300, le=65535)
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0)


class OptimSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, ge=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "steward-decoder"
    out_dir: str = "runs/decoder"
    seed: int = 1337
    precision: Literal["fp32", "bf16"] = "bf16"
    threads: int | None = Field(None, ge=1)
    model: dict[str, Any] = Field(default_factory=dict)
    data: DataSection
    optim: OptimSection = Field(default_factory=lambda: OptimSection())
    eval_every: int = Field(200, ge=1)
    eval_windows: int = Field(64, ge=1)
    ckpt_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    time_limit_minutes: float | None = Field(None, gt=0)
    save_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Weight of answer tokens (T0/self-instruct completions) in the training loss relative to the
    # rest; above 1 it teaches the prompt→answer mapping faster than plain language modelling.
    answer_loss_weight: float = Field(1.0, gt=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.optim.min_lr > self.optim.lr:
            raise ValueError("optim.min_lr must not exceed optim.lr")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, base_dir: Path | None = None) -> TrainConfig:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text())
        except FileNotFoundError as exc:
            raise TrainConfigError(f"training config not found: {p}") from exc
        except yaml.YAMLError as exc:
            raise TrainConfigError(f"{p}: invalid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise TrainConfigError(f"{p}: the training config must be a mapping")
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise TrainConfigError(f"{p}: {loc}: {first['msg']}") from exc
        # Relative paths in a config are relative to the config file, so it runs from anywhere.
        root = base_dir or p.resolve().parent
        if not Path(cfg.data.corpus_dir).is_absolute():
            cfg.data.corpus_dir = str((root / cfg.data.corpus_dir).resolve())
        return cfg


# ---------------------------------------------------------------------------------------------
# Distributed helpers


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self, finished: bool = True) -> None:
        # After a finished run every rank meets here before any tears the group down: a rank that
        # destroyed its gloo group while the other was still finishing made the other abort at exit
        # ("terminate called without an active exception", exit -6) in about one run in six. A rank
        # that failed does not wait: its peers are stuck in a collective, and exiting lets torchrun
        # stop them.
        if self.enabled and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Tokenised data


def render(doc: Document, tok: Tokenizer) -> tuple[str, str]:
    """(context, answer): the chat-formatted prompt and the completion the model must produce."""
    if doc.is_pair:
        return tok.apply_chat_template([{"role": "user", "content": doc.prompt}]), doc.completion + EOS
    return "", doc.completion + EOS


def encode_documents(docs: list[Document], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """One token stream of every document, whole, and a parallel flag stream marking answer tokens.

    Long documents are kept whole rather than truncated: training windows are drawn at random
    offsets, so a long T0 article contributes language-modelling signal along its length and the
    windows that reach its end still see the question and the answer together. Context and answer
    are encoded separately (the template ends in a special token and a newline, a pre-token boundary
    for byte-level BPE), so the flags mark exactly the answer's tokens.
    """
    pairs = [render(d, tok) for d in docs]
    ctx_ids = tok.encode_batch([c for c, _ in pairs])
    ans_ids = tok.encode_batch([a for _, a in pairs])
    ids = [np.asarray(c + a, dtype=np.uint16) for c, a in zip(ctx_ids, ans_ids, strict=True)]
    flags = [
        np.concatenate([np.zeros(len(c), np.uint8), np.full(len(a), int(d.is_pair), np.uint8)])
        for d, c, a in zip(docs, ctx_ids, ans_ids, strict=True)
    ]
    if not ids:
        return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint8)
    return np.concatenate(ids), np.concatenate(flags)


def lr_at(step: int, o: OptimSection) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def batch_at(
    stream: np.ndarray,
    step: int,
    index: int,
    batch_size: int,
    context: int,
    seed: int,
    answer_flags: np.ndarray | None = None,
    answer_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs, targets and (when answers are up-weighted) per-target loss weights."""
    rng = np.random.default_rng([seed, step, index])
    starts = rng.integers(0, len(stream) - context - 1, size=batch_size)
    win = np.stack([stream[s : s + context + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(win)
    weights = None
    if answer_flags is not None and answer_weight != 1.0:
        f = np.stack([answer_flags[s + 1 : s + context + 1] for s in starts]).astype(np.float32)
        weights = torch.from_numpy(1.0 + (answer_weight - 1.0) * f)
    return t[:, :-1], t[:, 1:], weights


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _optimizer_tensors(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"state.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, v in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state[int(pid)][key] = v
    opt.load_state_dict({"state": dict(state), "param_groups": meta["param_groups"]})


def save_checkpoint(
    directory: Path, model: Decoder, opt: torch.optim.Optimizer, step: int, keep: int
) -> Path:
    ck = directory / f"step_{step:07d}"
    tmp = directory / f".tmp_step_{step:07d}"
    tmp.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_embeddings
    }
    save_file(state, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **meta}) + "\n")
    if ck.exists():
        for f in ck.iterdir():
            f.unlink()
        ck.rmdir()
    tmp.rename(ck)  # atomic: a crash mid-save never leaves a half checkpoint as "latest"
    for old in sorted(directory.glob("step_*"))[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return ck


def latest_checkpoint(directory: Path) -> Path | None:
    cks = sorted(directory.glob("step_*"))
    return cks[-1] if cks else None


def load_checkpoint(ck: Path, model: Decoder, opt: torch.optim.Optimizer) -> int:
    """Restore model, optimizer and RNG from `ck`; a damaged file is a one-line TrainConfigError."""
    name = "model.safetensors"
    try:
        state = load_file(str(ck / name))
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["embed.token.weight"]
        model.load_state_dict(state)
        name = "optimizer.safetensors"
        tensors = load_file(str(ck / name))
        name = "trainer_state.json"
        meta = json.loads((ck / name).read_text())
        step = int(meta["step"])
        name = "optimizer.safetensors"
        _load_optimizer(opt, tensors, meta)
        torch.set_rng_state(tensors["rng.torch"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise TrainConfigError(
            f"{ck / name}: corrupt or unreadable checkpoint ({reason}); "
            f"delete {ck} to resume from the previous checkpoint"
        ) from exc
    return step


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def heldout_loss(model: Decoder, stream: np.ndarray, context: int, windows: int, batch: int = 8) -> float:
    """Mean next-token loss over up to `windows` consecutive, non-overlapping held-out windows."""
    n = min(windows, (len(stream) - 1) // context)
    if n <= 0:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = range(i, min(n, i + batch))
        win = np.stack([stream[j * context : j * context + context + 1] for j in idx]).astype(np.int64)
        t = torch.from_numpy(win)
        logits = model(t[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), t[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += t[:, 1:].numel()
    model.train(was_training)
    return total / count


T0_FAMILIES = (
    "ag_news",
    "amazon_polarity",
    "app_reviews",
    "cosmos_qa",
    "dbpedia_14",
    "glue_mrpc",
    "glue_qqp",
    "imdb",
    "paws",
    "qasc",
    "rotten_tomatoes",
    "social_i_qa",
    "wiki_qa",
    "wiqa",
    "yelp_review_full",
)


# Answer choices the T0 (promptsource) templates declare, for families whose sample in the corpus
# happens to hold a single label: ranking needs the full option set, not just the labels seen.
DECLARED_CHOICES: dict[str, tuple[str, ...]] = {
    "imdb": ("negative", "positive"),
    "rotten_tomatoes": ("negative", "positive"),
    "ag_news": ("World politics", "Sports", "Business", "Science and technology"),
    "dbpedia_14": (
        "Company",
        "Educational Institution",
        "Artist",
        "Athlete",
        "Office Holder",
        "Mean Of Transportation",
        "Building",
        "Natural Place",
        "Village",
        "Animal",
        "Plant",
        "Album",
        "Film",
        "Written Work",
    ),
}


def task_family(task: str) -> str:
    matches = [f for f in T0_FAMILIES if task.startswith(f)]
    return max(matches, key=len) if matches else task


@torch.no_grad()
def option_logprob(
    model: Decoder, tok: Tokenizer, prompt_ids: list[int], options: list[str], context: int
) -> list[float]:
    """Sum of log p(option tokens, then EOS | prompt) for each option, in one padded batch."""
    eos = tok.eos_id
    seqs, spans = [], []
    for opt in options:
        o = tok.encode(opt) + ([eos] if eos is not None else [])
        p = prompt_ids[-(context - len(o)) :]
        seqs.append(p + o)
        spans.append((len(p), len(p) + len(o)))
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: positions of real tokens start at 0
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logp = torch.log_softmax(model(ids, mask).float(), dim=-1)
    scores = []
    for i, (a, b) in enumerate(spans):
        tgt = ids[i, a:b]
        scores.append(float(logp[i, a - 1 : b - 1].gather(-1, tgt[:, None]).sum()))
    return scores


def t0_classification(
    model: Decoder, tok: Tokenizer, train: list[Document], heldout: list[Document], context: int
) -> dict[str, Any]:
    """Accuracy on held-out T0 classification prompts by ranking label likelihoods, per family.

    A task counts as classification when its training completions take at most 10 distinct values
    and, together with the template's declared answer choices, give at least two options. The
    majority-class baseline is the most frequent training label, scored on the same held-out rows
    (for a family whose sample holds one label that baseline is 1.0, and it is reported as such).
    """
    labels: dict[str, list[str]] = defaultdict(list)
    for d in train:
        if d.source.startswith("t0/"):
            labels[d.source].append(d.completion)
    per_family: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "correct": 0, "majority": 0})
    skipped: dict[str, str] = {}
    model.eval()
    for source, comps in sorted(labels.items()):
        fam = task_family(source.removeprefix("t0/"))
        if len(set(comps)) > 10:
            continue  # generation task (QA, summaries), not classification
        options = sorted(set(comps) | set(DECLARED_CHOICES.get(fam, ())))
        if len(options) < 2:
            skipped[source] = "one label in the data and no declared answer choices"
            continue
        majority = max(options, key=comps.count)
        for d in heldout:
            if d.source != source or d.completion not in options:
                continue
            prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": d.prompt}]))
            scores = option_logprob(model, tok, prompt, options, context)
            pred = options[int(np.argmax(scores))]
            f = per_family[fam]
            f["n"] += 1
            f["correct"] += int(pred == d.completion)
            f["majority"] += int(majority == d.completion)
    fams = {
        k: {
            "n": v["n"],
            "accuracy": v["correct"] / v["n"],
            "majority_baseline": v["majority"] / v["n"],
        }
        for k, v in sorted(per_family.items())
        if v["n"]
    }
    n = sum(v["n"] for v in per_family.values())
    return {
        "families": fams,
        "macro_accuracy": float(np.mean([f["accuracy"] for f in fams.values()])) if fams else float("nan"),
        "macro_majority_baseline": float(np.mean([f["majority_baseline"] for f in fams.values()]))
        if fams
        else float("nan"),
        "examples": n,
        "skipped_tasks": skipped,
    }


# ---------------------------------------------------------------------------------------------
# The run


class _Progress:
    """A rich progress bar on an interactive stderr; periodic plain lines otherwise."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        import sys

        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.enabled = enabled

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled:
            import sys

            print(f"step {step}: {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def data_config_hash(cfg: TrainConfig) -> str:
    """SHA-256 of what the prepared data and tokenizer depend on: the `data` section."""
    key = json.dumps({"version": 1, "data": cfg.data.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _prepared_is_current(cfg: TrainConfig, ready: Path, resume: bool) -> bool:
    """Whether `ready` marks data prepared with this data config. On --resume a mismatch is an
    error (the checkpoint was trained on that data); a fresh run prepares the data again."""
    if not ready.is_file():
        return False
    try:
        recorded = json.loads(ready.read_text()).get("data_config_sha256")
    except (ValueError, AttributeError):
        recorded = None
    if recorded == data_config_hash(cfg):
        return True
    if resume:
        if recorded is None:  # prepared before the hash was recorded: train_config.json was checked
            return True
        raise TrainConfigError(
            f"--resume: {ready.parent} was prepared with another data config than {cfg.out_dir}'s "
            "run; resume with the config the run was started with"
        )
    return False


def _prepare_data(
    cfg: TrainConfig, out: Path, d: Dist, resume: bool = False
) -> tuple[Tokenizer, np.ndarray, np.ndarray, np.ndarray | None, PreparedData | None]:
    data_dir = out / "data"
    ready = data_dir / "ready.json"
    prepared: PreparedData | None = None
    if d.main and not _prepared_is_current(cfg, ready, resume):
        ready.unlink(missing_ok=True)  # until the new data is complete, none counts as prepared
        prepared = prepare(
            cfg.data.corpus_dir,
            heldout_fraction=cfg.data.heldout_fraction,
            seed=cfg.data.split_seed,
            near_dup_threshold=cfg.data.near_dup_threshold,
        )
        tok = train_bpe((render_plain(x) for x in prepared.train), cfg.data.vocab_size)
        data_dir.mkdir(parents=True, exist_ok=True)
        tok.save(data_dir)
        train_stream, train_flags = encode_documents(prepared.train, tok)
        heldout_stream, _ = encode_documents(prepared.heldout, tok)
        np.save(data_dir / "train.npy", train_stream)
        np.save(data_dir / "train_answer_flags.npy", train_flags)
        np.save(data_dir / "heldout.npy", heldout_stream)
        with (data_dir / "documents.jsonl").open("w") as f:
            for split, docs in (("train", prepared.train), ("heldout", prepared.heldout)):
                for doc in docs:
                    f.write(
                        json.dumps(
                            {
                                "split": split,
                                "source": doc.source,
                                "prompt": doc.prompt,
                                "completion": doc.completion,
                            }
                        )
                        + "\n"
                    )
        write_data_card(
            prepared.card,
            out,
            {
                "train_tokens": len(train_stream),
                "heldout_tokens": len(heldout_stream),
                "vocab_size": tok.vocab_size,
            },
        )
        ready.write_text(
            json.dumps({"train_tokens": len(train_stream), "data_config_sha256": data_config_hash(cfg)})
            + "\n"
        )
    d.barrier()
    tok2 = Tokenizer.from_file(data_dir / "tokenizer.json")
    flags_path = data_dir / "train_answer_flags.npy"
    flags = np.load(flags_path) if flags_path.is_file() else None
    return (
        tok2,
        np.load(data_dir / "train.npy"),
        np.load(data_dir / "heldout.npy"),
        flags,
        prepared,
    )


def model_config(cfg: TrainConfig, tok: Tokenizer) -> TransformerConfig:
    return TransformerConfig.from_dict(
        {
            **cfg.model,
            "arch": "decoder",
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id,
            "name": cfg.name,
        }
    )


def build_optimizer(model: Decoder, o: OptimSection) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, LayerNorm gains or positions' rows)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        foreach=True,
    )


def render_plain(doc: Document) -> str:
    return f"{doc.prompt}\n{doc.completion}" if doc.prompt else doc.completion


def load_documents(out: Path) -> tuple[list[Document], list[Document]]:
    train: list[Document] = []
    heldout: list[Document] = []
    with (out / "data" / "documents.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            (train if r["split"] == "train" else heldout).append(
                Document(r["source"], r["prompt"], r["completion"])
            )
    return train, heldout


# Settings a resumed run may change: how long it runs, where and how often it reports and saves,
# and what the export is called; none of them changes the steps it shares with the interrupted run.
RESUME_FREE_KEYS = frozenset(
    {
        "out_dir",
        "threads",
        "time_limit_minutes",
        "optim.max_steps",
        "log_every",
        "eval_every",
        "eval_windows",
        "ckpt_every",
        "keep_checkpoints",
        "name",
        "save_dtype",
    }
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    return {prefix.removesuffix("."): value}


def check_resume_config(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume with a config other than the interrupted run's (its train_config.json):
    a changed seed, batch, learning rate, model or data section makes the resume silently inexact."""
    path = out / "train_config.json"
    if not path.is_file():
        return  # a run from before the config was saved beside it
    try:
        saved = TrainConfig.model_validate(json.loads(path.read_text()))
    except (ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise TrainConfigError(f"{path}: unreadable saved config ({reason})") from exc
    was = _flatten(json.loads(saved.model_dump_json()))
    now = _flatten(json.loads(cfg.model_dump_json()))
    missing = object()
    changed = sorted(
        k
        for k in was.keys() | now.keys()
        if k not in RESUME_FREE_KEYS and was.get(k, missing) != now.get(k, missing)
    )
    if changed:

        def show(v: Any) -> str:
            return "unset" if v is missing else json.dumps(v)[:60]

        diffs = ", ".join(f"{k} {show(was.get(k, missing))} -> {show(now.get(k, missing))}" for k in changed)
        raise TrainConfigError(
            f"--resume: the config differs from the interrupted run's ({path}): {diffs}; "
            "resume with the run's config, or train into another --out"
        )


def check_unused(out: Path) -> None:
    """A fresh run refuses a directory that holds another run's checkpoints or export: mixing them
    would prune the new checkpoints behind the old ones and let --resume continue the old run."""
    used = []
    if latest_checkpoint(out / "checkpoints") is not None:
        used.append("checkpoints/")
    used += [n for n in ("model/", "final_metrics.json") if (out / n.rstrip("/")).exists()]
    if used:
        raise TrainConfigError(
            f"{out} already holds a training run ({', '.join(used)}): pass --resume to continue it, "
            "or choose another --out or clear the directory"
        )


def run(
    cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train; return the final metrics. `stop_after` ends the run early at that step (for tests)."""
    d = Dist()
    finished = False
    try:
        result = _run(cfg, d, resume=resume, stop_after=stop_after, progress=progress)
        finished = True
        return result
    finally:
        d.close(finished)


def _run(
    cfg: TrainConfig, d: Dist, *, resume: bool, stop_after: int | None, progress: bool
) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ck_dir = out / "checkpoints"
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"out_dir {out} exists and is not a directory")
    if resume:
        if latest_checkpoint(ck_dir) is None:
            raise TrainConfigError(f"--resume: no checkpoint under {ck_dir}")
        check_resume_config(cfg, out)
    else:
        check_unused(out)
    d.barrier()  # every rank has read the run directory before the main rank writes to it
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    d.barrier()
    tok, train_stream, heldout_stream, answer_flags, _ = _prepare_data(cfg, out, d, resume)
    mcfg = model_config(cfg, tok)
    context = mcfg.max_positions
    if len(train_stream) <= context + 1:
        raise TrainConfigError(
            f"training data has {len(train_stream)} tokens, fewer than one window of {context + 1}"
        )

    torch.manual_seed(cfg.seed)
    model = Decoder(mcfg)
    model.train()
    opt = build_optimizer(model, cfg.optim)
    o = cfg.optim
    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume:
        ck = latest_checkpoint(ck_dir)
        if ck is None:
            raise TrainConfigError(f"--resume: no checkpoint under {ck_dir}")
        start = load_checkpoint(ck, model, opt) + 1
        if d.main and metrics_path.is_file():  # drop what the interrupted run logged past the checkpoint
            kept = [
                ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) < start
            ]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
    elif d.main and metrics_path.exists():
        metrics_path.unlink()

    ddp: Any = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    bar = _Progress(o.max_steps, start, progress and d.main)
    log = metrics_path.open("a") if d.main else None
    t0 = time.time()
    tokens_per_step = o.batch_size * context * o.grad_accum * d.world
    last_step = start - 1
    try:
        for step in range(start, o.max_steps):
            lr = lr_at(step, o)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(o.grad_accum):
                x, y, w = batch_at(
                    train_stream,
                    step,
                    micro * d.world + d.rank,
                    o.batch_size,
                    context,
                    cfg.seed,
                    answer_flags,
                    cfg.answer_loss_weight,
                )
                sync = nullcontext() if (not d.enabled or micro == o.grad_accum - 1) else ddp.no_sync()
                with sync:
                    with autocast:
                        logits = ddp(x)
                    ce = F.cross_entropy(
                        logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none"
                    )
                    loss = ce.mean() if w is None else (ce * w.reshape(-1)).sum() / w.sum()
                    (loss / o.grad_accum).backward()
                loss_sum += float(loss.detach())
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(
                    model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf")
                )
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
            train_loss = d.mean(loss_sum / o.grad_accum)
            last_step = step
            record: dict[str, Any] | None = None
            if step % cfg.log_every == 0 or step == o.max_steps - 1:
                record = {
                    "step": step,
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": (step + 1) * tokens_per_step,
                    "elapsed_s": round(time.time() - t0, 2),
                }
            if (step + 1) % cfg.eval_every == 0 or step == o.max_steps - 1:
                hl = (
                    heldout_loss(model, heldout_stream, context, cfg.eval_windows) if d.main else float("nan")
                )
                record = {
                    **(record or {"step": step}),
                    "heldout_loss": hl,
                    "heldout_ppl": math.exp(hl),
                }
            if record is not None and log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.update(step + 1, f"loss {train_loss:.3f} lr {lr:.2e}")
            out_of_time = (
                cfg.time_limit_minutes is not None and time.time() - t0 > cfg.time_limit_minutes * 60
            )
            stopping = out_of_time or (stop_after is not None and step >= stop_after)
            if (step + 1) % cfg.ckpt_every == 0 or stopping:
                if d.main:
                    save_checkpoint(ck_dir, model, opt, step, cfg.keep_checkpoints)
                d.barrier()
            if stopping:
                break
    finally:
        bar.close()
        if log is not None:
            log.close()

    result: dict[str, Any] = {"last_step": last_step, "train_seconds": round(time.time() - t0, 1)}
    if d.main and (stop_after is None or last_step >= o.max_steps - 1):
        result.update(finalize(cfg, model, tok, heldout_stream, out))
    return result


def evaluate_latest(cfg: TrainConfig) -> dict[str, Any]:
    """Re-run the final evaluation and export from the latest checkpoint of an existing run.

    For a run whose evaluation code changed after it trained, or whose export was lost: the
    weights come from the checkpoint, the data from the run's own prepared split.
    """
    out = Path(cfg.out_dir)
    ck = latest_checkpoint(out / "checkpoints")
    if ck is None or not (out / "data" / "ready.json").is_file():
        raise TrainConfigError(f"no prepared data and checkpoint under {out}: train first")
    tok = Tokenizer.from_file(out / "data" / "tokenizer.json")
    mcfg = model_config(cfg, tok)
    model = Decoder(mcfg)
    opt = build_optimizer(model, cfg.optim)
    step = load_checkpoint(ck, model, opt)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    metrics = finalize(cfg, model, tok, np.load(out / "data" / "heldout.npy"), out)
    return {"checkpoint_step": step, **metrics}


def finalize(
    cfg: TrainConfig, model: Decoder, tok: Tokenizer, heldout_stream: np.ndarray, out: Path
) -> dict[str, Any]:
    """Held-out metrics, the exported model (safetensors + manifest) and its model card."""
    model.eval()
    hl = heldout_loss(model, heldout_stream, model.config.max_positions, windows=10**9)
    train_docs, heldout_docs = load_documents(out)
    cls = t0_classification(model, tok, train_docs, heldout_docs, model.config.max_positions)
    metrics = {
        "heldout_loss": hl,
        "heldout_perplexity": math.exp(hl),
        "heldout_tokens": len(heldout_stream),
        "t0_classification": cls,
    }
    card = json.loads((out / "data_card.json").read_text())
    export = out / "model"
    save_model(
        model,
        export,
        tok,
        dtype=torch.bfloat16 if cfg.save_dtype == "bfloat16" else torch.float32,
        metadata={
            "name": cfg.name,
            "metrics": metrics,
            "train_config": json.loads(cfg.model_dump_json()),
            "data_sha256": card["source_files_sha256"],
            "data_card": {k: v for k, v in card.items() if k != "source_files_sha256"},
        },
    )
    write_model_card(export, cfg, model, metrics, card)
    # The card is part of the directory: re-hash so the manifest covers it too.
    manifest = json.loads((export / "manifest.json").read_text())
    for name in ("MODEL_CARD.md", "DATA_CARD.md"):
        if (export / name).is_file():
            manifest["files"][name] = sha256_file(export / name)
    (export / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "final_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_model_card(
    export: Path, cfg: TrainConfig, model: Decoder, metrics: dict[str, Any], card: dict[str, Any]
) -> None:
    c = model.config
    cls = metrics["t0_classification"]
    rows = "\n".join(
        f"| {fam} | {v['n']} | {v['accuracy']:.3f} | {v['majority_baseline']:.3f} |"
        for fam, v in cls["families"].items()
    )
    text = f"""# Model card: {cfg.name}

## Model details
A decoder-only Transformer (GPT-2 style: pre-LayerNorm, learned absolute positions, GELU FFN, tied
LM head) written in `steward.model`, {model.num_parameters():,} parameters: {c.n_layers} layers,
d_model {c.d_model}, {c.n_heads} heads, d_ff {c.d_ff}, context {c.max_positions} tokens, byte-level
BPE vocabulary of {c.vocab_size} trained on the training split. Weights stored as {cfg.save_dtype}
safetensors; every file's SHA-256 is in `manifest.json`, checked on load.

## Intended use
A small, fully offline demonstrator behind Steward's gateway and a test bed for guards, traces and
attributions. It follows Steward's chat template and answers T0-style task prompts. It is not a
capable assistant, has no safety tuning of its own and must not be relied on for facts.

## Training data
See `DATA_CARD.md`: T0 task pairs, self-instruct instructions and Tiny Shakespeare from
`../shared/data/corpus/`, PII-scrubbed, exact- and near-duplicate-removed, split per document.

## Training
AdamW (β=({cfg.optim.beta1}, {cfg.optim.beta2}), weight decay {cfg.optim.weight_decay}), lr
{cfg.optim.lr} with {cfg.optim.warmup_steps} warmup steps and cosine decay to {cfg.optim.min_lr},
{cfg.optim.max_steps} steps of {cfg.optim.batch_size}×{cfg.optim.grad_accum} windows of {c.max_positions}
tokens, gradient clipping at {cfg.optim.grad_clip}, {cfg.precision} autocast, seed {cfg.seed};
answer tokens of prompt/answer pairs weighted ×{cfg.answer_loss_weight:g} in the loss.
Reproduce with `steward train configs/builtin.yaml`.

## Evaluation (held-out split only)
- Held-out loss {metrics["heldout_loss"]:.4f} nats/token, perplexity **{metrics["heldout_perplexity"]:.2f}**
  over {metrics["heldout_tokens"]:,} tokens.
- T0 classification, scored by ranking each label's likelihood after the prompt (macro accuracy
  {cls["macro_accuracy"]:.3f} vs majority-class baseline {cls["macro_majority_baseline"]:.3f},
  {cls["examples"]} held-out prompts):

| family | n | accuracy | majority baseline |
|---|---|---|---|
{rows}

Tasks skipped because the data holds a single label: {", ".join(sorted(cls["skipped_tasks"])) or "none"}.

## Limitations and risks
Tiny model, tiny corpus: fluent-looking but often wrong text; English only; biases of the source
datasets (news, reviews, web QA) carry over. Use Steward's guards and evaluation suites around it.
"""
    (export / "MODEL_CARD.md").write_text(text)
    if (Path(cfg.out_dir) / "DATA_CARD.md").is_file():
        (export / "DATA_CARD.md").write_text((Path(cfg.out_dir) / "DATA_CARD.md").read_text())
