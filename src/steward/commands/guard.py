"""`steward guard train`: train the guard classifier on ../shared/data and write models/guard/.

By default the encoder's top blocks are fine-tuned together with the head (`--top-layers 4`, see
`steward.guard.finetune`); `--top-layers 0` trains only a head on frozen sentence embeddings, which
are cached (by text hash) under --cache so refitting the head with other hyper-parameters is quick.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

__all__ = ["register"]

# The committed multilingual reader: e5's top 4 of 12 blocks fine-tuned with its head for 3 epochs.
ML_TOP_LAYERS = 4
ML_EPOCHS = 3


def register(app: typer.Typer) -> None:
    guard_app = typer.Typer(help="Guard models: train the classifier head.", no_args_is_help=True)

    @guard_app.command("train")
    def train_command(
        data: Path = typer.Option(Path("../shared/data"), "--data", help="data root (guard/, corpus/)"),
        out: Path = typer.Option(Path("models/guard"), "--out", help="output directory for the head"),
        cache: Path = typer.Option(Path("runs/guard_cache"), "--cache", help="embedding cache directory"),
        seed: int = typer.Option(0, "--seed"),
        split: int = typer.Option(
            3, "--split", min=1, max=3, help="grouping rules of the split (guard.dataset.SPLIT_VERSION)"
        ),
        epochs: int | None = typer.Option(
            None, "--epochs", min=1, help="passes over the data (default: 4 fine-tuning, 60 head only)"
        ),
        top_layers: int = typer.Option(
            4, "--top-layers", min=0, help="encoder blocks fine-tuned with the head (0: frozen encoder)"
        ),
        depth: int | None = typer.Option(
            None, "--depth", min=1, help="encoder blocks the guard runs (default: all; fewer is faster)"
        ),
        lr_encoder: float = typer.Option(
            5e-5, "--lr-encoder", min=0.0, help="peak learning rate of tuned blocks"
        ),
        hidden: int = typer.Option(256, "--hidden", min=1),
        threads: int = typer.Option(1, "--threads", min=1, help="torch intra-op threads"),
        target_fpr: float = typer.Option(
            0.02, "--target-fpr", min=0.0, max=0.5, help="FPR target per benign set (validation)"
        ),
        limit: int | None = typer.Option(
            None, "--limit", min=1, help="keep only N examples per source (a quick smoke run)"
        ),
        long_docs: int = typer.Option(400, "--long-docs", min=0, help="long documents with one injection"),
        synth_per_template: int = typer.Option(12, "--synth-per-template", min=0),
        diluted: int = typer.Option(
            0, "--diluted", min=0, help="harmful and as many benign requests placed behind benign text"
        ),
        check_precision: list[str] = typer.Option(
            ["bf16", "int8"], "--check-precision", help="encoder precisions compared with fp32 on held-out"
        ),
        no_precision_check: bool = typer.Option(False, "--no-precision-check"),
        lexical: bool = typer.Option(False, "--lexical", help="add the token unigram/bigram linear path"),
        multilingual: bool = typer.Option(
            True, "--multilingual/--no-multilingual", help="then add the multilingual reader (e5 head)"
        ),
        mask_context_only: bool = typer.Option(
            False,
            "--mask-context-only",
            help="train without CyberSecEval's attacks that only break their own system prompt's rule "
            "(still evaluated)",
        ),
    ) -> None:
        """Train the injection/jailbreak/harmful/toxicity head; print held-out metrics."""
        import torch

        from steward.guard.finetune import FinetuneConfig, train_guard
        from steward.guard.train import TrainConfig, train_head

        if not (data / "guard").is_dir():
            raise FileNotFoundError(f"{data}/guard not found (pass --data)")
        torch.set_num_threads(threads)
        cfg = TrainConfig(
            data_dir=data,
            out_dir=out,
            cache_dir=cache,
            seed=seed,
            split=split,
            epochs=epochs if epochs is not None else 60,
            hidden=hidden,
            target_fpr=target_fpr,
            limit=limit,
            long_docs=long_docs,
            synth_per_template=synth_per_template,
            diluted=diluted,
            check_precisions=() if no_precision_check else tuple(check_precision),
            lexical=lexical,
            mask_context_only=mask_context_only,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        if depth is not None and not top_layers:
            raise typer.BadParameter("--depth drops encoder blocks; it needs --top-layers >= 1")
        if top_layers and lexical:
            raise typer.BadParameter("--lexical is a head-only option: pass --top-layers 0 with it")
        if top_layers:
            ft = FinetuneConfig(top_layers=top_layers, epochs=epochs or 4, lr_encoder=lr_encoder, depth=depth)
            report = train_guard(cfg, ft)
        else:
            report = train_head(cfg)
        if multilingual:
            # A retrained main head changes the OR the e5 thresholds were chosen with: retrain both.
            from steward.guard.multilingual import train_multilingual

            train_multilingual(
                data,
                out,
                cache / "e5",
                seed=seed,
                log=cfg.log,
                limit=limit,
                long_docs=long_docs,
                synth_per_template=synth_per_template,
                top_layers=ML_TOP_LAYERS if top_layers else 0,  # a frozen main head: a frozen reader
                epochs=ML_EPOCHS,
                mask_context_only=mask_context_only,
            )
        summary = {
            cat: {k: m[k] for k in ("precision", "recall", "f1", "fpr", "tpr_at_1pct_fpr", "threshold")}
            for cat, m in report["heldout"].items()
        }
        print(json.dumps({"heldout": summary}, indent=2))

    @guard_app.command("train-multilingual")
    def train_multilingual_command(
        data: Path = typer.Option(Path("../shared/data"), "--data", help="data root (guard/, corpus/)"),
        head: Path = typer.Option(Path("models/guard"), "--head", help="trained guard head to extend"),
        cache: Path = typer.Option(
            Path("runs/guard_cache_e5"), "--cache", help="multilingual embedding cache directory"
        ),
        seed: int = typer.Option(0, "--seed"),
        threads: int = typer.Option(1, "--threads", min=1, help="torch intra-op threads"),
        top_layers: int = typer.Option(
            ML_TOP_LAYERS, "--top-layers", min=0, max=12, help="e5 blocks tuned with the head (0: frozen)"
        ),
        epochs: int = typer.Option(ML_EPOCHS, "--epochs", min=1, help="passes (with --top-layers)"),
        limit: int | None = typer.Option(
            None, "--limit", min=1, help="keep only N examples per source (as the main head was trained)"
        ),
        long_docs: int = typer.Option(400, "--long-docs", min=0, help="as the main head was trained"),
        synth_per_template: int = typer.Option(12, "--synth-per-template", min=0),
        thresholds_only: bool = typer.Option(
            False,
            "--thresholds-only",
            help="keep the reader's weights; choose its thresholds again on scores as served",
        ),
    ) -> None:
        """Add the multilingual reader (multilingual-e5-small + head) to a trained guard head."""
        import torch

        from steward.guard.multilingual import retune_multilingual, train_multilingual

        if not (data / "guard").is_dir():
            raise FileNotFoundError(f"{data}/guard not found (pass --data)")
        if not (head / "manifest.json").is_file():
            raise FileNotFoundError(f"{head}/manifest.json not found: train the main head first")
        torch.set_num_threads(threads)

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        if thresholds_only:
            report = retune_multilingual(
                data, head, log=log, limit=limit, long_docs=long_docs, synth_per_template=synth_per_template
            )
        else:
            report = train_multilingual(
                data,
                head,
                cache,
                seed=seed,
                log=log,
                top_layers=top_layers,
                epochs=epochs,
                limit=limit,
                long_docs=long_docs,
                synth_per_template=synth_per_template,
            )
        summary = {
            part: {
                cat: {k: m[k] for k in ("precision", "recall", "f1", "threshold")}
                for cat, m in report["heldout"][part].items()
            }
            for part in ("main_head", "combined")
        }
        print(json.dumps({"heldout_routed": summary}, indent=2))

    app.add_typer(guard_app, name="guard")
