"""Fine-tuning the encoder's top blocks together with the guard head (`steward guard train`).

Why: a head on *frozen* all-MiniLM-L6-v2 sentence embeddings stalled at injection recall 0.36 (F1
0.50) on the held-out split. Those embeddings were trained for topical similarity, so "can I
ignore this warning?" and "ignore your instructions" sit close together and an instruction buried
in a document is averaged away by the document's topic. Letting the last `top` blocks move with
the head gives the representation room to separate them.

How it stays cheap and shared:
- the bottom `L - top` blocks keep the MiniLM weights, so their hidden states are computed once
  per training run (with the same bf16 packed path inference uses) and cached; training then
  costs `top / L` of a full fine-tune;
- at inference the guard's *private* encoder copy (`classifier._inference_copy`) carries the tuned
  top blocks; the process's shared `SentenceEncoder` (embeddings endpoint, leak similarity) keeps
  the published weights, and a request still costs one encoder pass;
- the tuned blocks are a few MB of safetensors next to the head, pinned by SHA-256 in the manifest.

The loss, label masking, class balance, hard-negative weights, validation-only threshold tuning and
held-out metrics are those of the frozen-embedding head (`steward.guard.train`), so the two are
compared on the same split.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from steward.model.layers import VarLen
from steward.model.transformer import Encoder, pool_packed

from .classifier import GuardHead

__all__ = [
    "FinetuneConfig",
    "GuardTower",
    "bottom_states",
    "fit_split",
    "fit_tower",
    "labelled_windows",
    "tower_scores",
]


@dataclass(slots=True)
class FinetuneConfig:
    top_layers: int = 4
    # Blocks the guard runs (None: all). Fewer is faster: the tuned blocks are initialised from
    # blocks depth-top .. depth-1 and the blocks above them are dropped from the guard's copy.
    depth: int | None = None
    epochs: int = 4
    lr_encoder: float = 5e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.06  # share of the steps with a linear warm-up
    tokens_per_step: int = 8192  # packed tokens per optimiser step
    max_windows_per_step: int = 64
    autocast_bf16: bool = True  # AMX/AVX512-BF16 matmuls with fp32 master weights


class GuardTower(nn.Module):
    """The encoder's top blocks, mean pooling, L2 normalisation and the guard head.

    Input: the packed hidden states [N, D] after the bottom blocks; output: logits [B, labels].
    """

    def __init__(
        self, encoder: Encoder, top: int, hidden: int, labels: int, depth: int | None = None
    ) -> None:
        super().__init__()
        blocks = list(encoder.blocks)
        depth = len(blocks) if depth is None else depth
        if not 0 < depth <= len(blocks):
            raise ValueError(f"depth must be in 1..{len(blocks)}, got {depth}")
        if not 0 < top <= depth:
            raise ValueError(f"top_layers must be in 1..{depth}, got {top}")
        self.blocks = nn.ModuleList(copy.deepcopy(b).float() for b in blocks[depth - top : depth])
        self.n_layers = depth  # the guard's depth: the tuned blocks are its last `top`
        self.norm = copy.deepcopy(encoder.norm).float() if encoder.norm is not None else None
        self.pooling = encoder.config.pooling
        d_model = encoder.config.d_model
        self.head = GuardHead(d_model, hidden, labels)

    def embed(self, x: torch.Tensor, varlen: VarLen) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, None, False, varlen=varlen)
        if self.norm is not None:
            x = self.norm(x)
        return F.normalize(pool_packed(x.float(), varlen, self.pooling), dim=-1)

    def forward(self, x: torch.Tensor, varlen: VarLen) -> torch.Tensor:
        return self.head(self.embed(x, varlen))  # type: ignore[no-any-return]

    def round_matrices(self) -> None:
        """Round the blocks' weight matrices to bf16 values, as they are stored (`top_state`).

        Training multiplied them in bf16 (autocast), so this loses nothing the head was fitted on
        and halves the file; biases and LayerNorms stay fp32. Done before validation, so the
        thresholds and metrics describe exactly the saved weights.
        """
        with torch.no_grad():
            for p in self.blocks.parameters():
                if p.dim() == 2:
                    p.copy_(p.to(torch.bfloat16).float())

    def top_state(self) -> dict[str, torch.Tensor]:
        """The tuned blocks under the encoder's own parameter names (`blocks.{i}.…`): weight
        matrices in bf16 (see `round_matrices`), everything else fp32."""
        out: dict[str, torch.Tensor] = {}
        first = self.n_layers - len(self.blocks)
        for i, block in enumerate(self.blocks):
            for name, p in block.state_dict().items():
                t = p.detach().to(torch.bfloat16 if p.dim() == 2 else torch.float32)
                out[f"blocks.{first + i}.{name}"] = t.contiguous()
        if self.norm is not None:
            for name, p in self.norm.state_dict().items():
                out[f"norm.{name}"] = p.detach().float().contiguous()
        return out


def bottom_states(
    model: nn.Module,
    rows: Sequence[list[int]],
    n_bottom: int,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """Hidden states [len, D] after the first `n_bottom` blocks of `model` for each row, stored as
    `dtype` (bf16 halves the ~2 GB a full training set takes).

    `model` is the guard's inference copy (bf16, packed weights where the CPU has AMX), so training
    sees the states inference will feed the tuned blocks.
    """
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    blocks = list(model.blocks)[:n_bottom]  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            flat = torch.tensor([t for i in idx for t in rows[i]])
            varlen = VarLen([len(rows[i]) for i in idx], max_runs=len(idx))
            x = model.embed(flat, varlen.positions)  # type: ignore[operator]
            for block in blocks:
                x = block(x, None, False, varlen=varlen)
            for i, part in zip(idx, torch.split(x, [len(rows[i]) for i in idx]), strict=True):
                out[i] = part.to(dtype).clone()
            if (s // batch_size) % 100 == 0:
                log(
                    f"  bottom states {min(len(order), s + batch_size)}/{len(order)} windows, "
                    f"{time.perf_counter() - t0:.0f}s"
                )
    return [o for o in out if o is not None]


def _batches(lengths: Sequence[int], cfg: FinetuneConfig, rng: random.Random | None) -> list[list[int]]:
    """Windows grouped by similar length under a token budget; shuffled batch order when `rng`."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if rng is not None:
        # Shuffle within equal lengths too, so batches differ from epoch to epoch.
        keyed = [(lengths[i], rng.random(), i) for i in order]
        order = [i for _, _, i in sorted(keyed)]
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and (width * (len(cur) + 1) > cfg.tokens_per_step or len(cur) >= cfg.max_windows_per_step):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _run(tower: GuardTower, states: Sequence[torch.Tensor], idx: list[int], autocast: bool) -> torch.Tensor:
    x = torch.cat([states[i] for i in idx]).float()
    varlen = VarLen([len(states[i]) for i in idx], max_runs=8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits: torch.Tensor = tower(x, varlen)
        return logits.float()


def tower_scores(tower: GuardTower, states: Sequence[torch.Tensor], cfg: FinetuneConfig) -> torch.Tensor:
    """Sigmoid scores [windows, labels] in input order."""
    tower.eval()
    out = torch.empty(len(states), tower.head.fc2.out_features)
    with torch.inference_mode():
        for idx in _batches([len(s) for s in states], cfg, None):
            out[torch.tensor(idx)] = torch.sigmoid(_run(tower, states, idx, cfg.autocast_bf16))
    return out


def fit_tower(
    encoder: Encoder,
    states: Sequence[torch.Tensor],
    y: torch.Tensor,
    w: torch.Tensor,
    val_states: Sequence[torch.Tensor],
    yv: torch.Tensor,
    cfg: FinetuneConfig,
    hidden: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> GuardTower:
    """Train the top blocks and head on windows (`states`, labels `y` with -1 = unlabelled, example
    weights `w`); keep the epoch with the lowest validation loss."""
    torch.manual_seed(seed)
    tower = GuardTower(encoder, cfg.top_layers, hidden, y.shape[1], cfg.depth)
    head_params = list(tower.head.parameters())
    body_params = [p for n, p in tower.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW(
        [
            {"params": body_params, "lr": cfg.lr_encoder, "weight_decay": cfg.weight_decay},
            {"params": head_params, "lr": cfg.lr_head, "weight_decay": 1e-3},
        ],
        foreach=True,
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    mask = (y >= 0).float()
    target = y.clamp(min=0).float()
    pos = (target * mask).sum(0)
    neg = ((1 - target) * mask).sum(0)
    pos_w = (neg / pos.clamp(min=1)).clamp(max=20)
    rng = random.Random(seed)
    lengths = [len(s) for s in states]
    steps_per_epoch = len(_batches(lengths, cfg, None))
    total = max(1, steps_per_epoch * cfg.epochs)
    warm = max(1, int(cfg.warmup * total))
    vmask = (yv >= 0).float()
    best_loss, best_state, step = float("inf"), None, 0
    log(
        f"fine-tuning the top {cfg.top_layers} blocks: {len(states)} windows, {sum(lengths)} tokens, "
        f"{steps_per_epoch} steps per epoch"
    )
    for epoch in range(cfg.epochs):
        tower.train()
        t0 = time.perf_counter()
        run_loss = 0.0
        for b, idx in enumerate(_batches(lengths, cfg, rng)):
            if step < warm:
                scale = step / warm
            else:
                scale = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g, lr in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr * scale
            it = torch.tensor(idx)
            logits = _run(tower, states, idx, cfg.autocast_bf16)
            wm = mask[it] * w[it, None]
            loss = F.binary_cross_entropy_with_logits(
                logits, target[it], weight=wm, pos_weight=pos_w, reduction="sum"
            ) / wm.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
            opt.step()
            step += 1
            run_loss += float(loss.detach())
            if b % 100 == 0:
                log(
                    f"  epoch {epoch} step {b}/{steps_per_epoch} loss {run_loss / (b + 1):.4f} "
                    f"{time.perf_counter() - t0:.0f}s"
                )
        probs = tower_scores(tower, val_states, cfg).clamp(1e-6, 1 - 1e-6)
        logits_v = torch.log(probs) - torch.log1p(-probs)
        vloss = F.binary_cross_entropy_with_logits(
            logits_v, yv.clamp(min=0).float(), weight=vmask, pos_weight=pos_w, reduction="sum"
        )
        vl = float(vloss / vmask.sum().clamp(min=1))
        train_loss = run_loss / max(1, steps_per_epoch)
        log(
            f"  epoch {epoch}: train loss {train_loss:.4f}, validation loss {vl:.4f}, "
            f"{time.perf_counter() - t0:.0f}s"
        )
        if vl < best_loss:
            best_loss, best_state = vl, copy.deepcopy(tower.state_dict())
    assert best_state is not None
    tower.load_state_dict(best_state)
    tower.round_matrices()
    tower.eval()
    return tower


def example_scores(window_scores: torch.Tensor, owners: Sequence[int], n_examples: int) -> torch.Tensor:
    """Per-example max over its windows (what inference reports for a document)."""
    out = torch.zeros(n_examples, window_scores.shape[1])
    if len(owners):
        idx = torch.tensor(list(owners))
        index = idx[:, None].expand_as(window_scores)
        out = out.scatter_reduce_(0, index, window_scores, "amax", include_self=True)
    return out


def labelled_windows(
    model: Any, examples: Sequence[Any], mask_context_only: bool = False
) -> tuple[list[list[int]], list[int], list[list[int]], list[float]]:
    """Each example's leading windows (token ids), owning example, per-window labels and weight.
    `mask_context_only`: as `steward.guard.train.TrainConfig.mask_context_only`."""
    from .train import _window_labels

    rows: list[list[int]] = []
    owners: list[int] = []
    labels: list[list[int]] = []
    weights: list[float] = []
    for i, e in enumerate(examples):
        wins = model.windows(e.model_text)
        n = min(len(wins), e.windows) if e.windows else len(wins)
        for (chunk, _), lab in zip(wins[:n], _window_labels(model, e, n, mask_context_only), strict=True):
            rows.append(chunk)
            owners.append(i)
            labels.append(lab)
            weights.append(e.weight)
    return rows, owners, labels, weights


def fit_split(
    encoder: Encoder,
    states: Sequence[torch.Tensor],
    owners: Sequence[int],
    split: Sequence[str],
    labels: Sequence[list[int]],
    weights: Sequence[float],
    cfg: FinetuneConfig,
    hidden: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> GuardTower:
    """`fit_tower` on the windows whose example is in the "train" split, validated on "val"."""
    tr = [k for k, o in enumerate(owners) if split[o] == "train"]
    va = [k for k, o in enumerate(owners) if split[o] == "val"]
    y = torch.tensor(list(labels), dtype=torch.long)
    w = torch.tensor(list(weights))
    return fit_tower(
        encoder, [states[k] for k in tr], y[tr], w[tr], [states[k] for k in va], y[va], cfg, hidden, seed, log
    )


def describe(cfg: FinetuneConfig) -> dict[str, Any]:
    return {
        "top_layers": cfg.top_layers,
        "depth": cfg.depth,
        "epochs": cfg.epochs,
        "lr_encoder": cfg.lr_encoder,
        "lr_head": cfg.lr_head,
        "weight_decay": cfg.weight_decay,
        "warmup": cfg.warmup,
        "tokens_per_step": cfg.tokens_per_step,
        "autocast_bf16": cfg.autocast_bf16,
    }


def train_guard(cfg: Any, ft: FinetuneConfig, model: Any = None) -> dict[str, Any]:
    """`steward guard train`: build data, cache bottom states, fine-tune, tune thresholds on
    validation, score held-out, save the tuned blocks and head with their manifest and card.

    `cfg` is a `steward.guard.train.TrainConfig` (data, split, weights, FPR targets, output).
    """
    from safetensors.torch import save_file

    from .classifier import GuardModel
    from .train import (
        check_outputs,
        metrics,
        score_agreement,
        split_examples,
        tune_for,
        write_artifacts,
    )

    check_outputs(cfg)
    torch.manual_seed(cfg.seed)
    examples, split = split_examples(cfg)
    if model is None:
        model = GuardModel.encoder_only(precision=cfg.extra.get("precision", "auto"))
    rows, owners, labels, weights = labelled_windows(model, examples, cfg.mask_context_only)
    n_layers = ft.depth if ft.depth is not None else len(list(model._infer.blocks))
    n_bottom = n_layers - ft.top_layers
    cfg.log(f"{len(rows)} windows; bottom {n_bottom} blocks run once ({model.precision})")
    states = bottom_states(model._infer, rows, n_bottom, log=cfg.log)

    va = [k for k, o in enumerate(owners) if split[o] == "val"]
    te = [k for k, o in enumerate(owners) if split[o] == "test"]
    tower = fit_split(
        model.encoder.model, states, owners, split, labels, weights, ft, cfg.hidden, cfg.seed, cfg.log
    )

    def doc_scores(idx: list[int]) -> tuple[list[Any], torch.Tensor]:
        ex_ids = sorted({owners[k] for k in idx})
        pos = {o: j for j, o in enumerate(ex_ids)}
        win = tower_scores(tower, [states[k] for k in idx], ft)
        return [examples[o] for o in ex_ids], example_scores(win, [pos[owners[k]] for k in idx], len(ex_ids))

    val_ex, val_scores = doc_scores(va)
    thresholds = tune_for(cfg, val_scores, val_ex)
    test_ex, test_scores = doc_scores(te)
    report: dict[str, Any] = {
        "validation": metrics(val_scores, val_ex, thresholds),
        "heldout": metrics(test_scores, test_ex, thresholds),
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    top_path = cfg.out_dir / "encoder_top.safetensors"
    save_file(tower.top_state(), str(top_path))
    head_path = cfg.out_dir / "head.safetensors"
    save_file({k: v.contiguous() for k, v in tower.head.state_dict().items()}, str(head_path))

    def save() -> None:
        write_artifacts(
            cfg,
            report,
            thresholds,
            dim=int(model.encoder.dim),
            head_path=head_path,
            top_path=top_path,
            top_layers=list(range(n_bottom, n_layers)),
            depth=n_layers,
            train_extra={"finetune": describe(ft)},
            examples=examples,
            split=split,
        )

    save()  # the precision check below loads the model through its manifest
    if not cfg.check_precisions:
        return report
    # Reduced precision against fp32, through the inference path itself (GuardModel), held-out only.
    test_rows = [rows[k] for k in te]
    test_owner = [owners[k] for k in te]
    ex_ids = sorted(set(test_owner))
    pos = {o: j for j, o in enumerate(ex_ids)}
    per_precision: dict[str, torch.Tensor] = {}
    for p in ("fp32", *cfg.check_precisions):
        gm = GuardModel(cfg.out_dir, precision=p)
        probs = gm.probabilities(gm.embed(test_rows))
        per_precision[p] = example_scores(probs, [pos[o] for o in test_owner], len(ex_ids))
    report["precision"] = {
        p: score_agreement(per_precision["fp32"], per_precision[p], thresholds) for p in cfg.check_precisions
    }
    save()
    return report
