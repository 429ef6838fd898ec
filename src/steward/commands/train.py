"""`steward train CONFIG`: train a decoder from a YAML config (see configs/builtin.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path = typer.Argument(..., help="YAML training config"),
        resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint"),
        out_dir: str | None = typer.Option(None, "--out", help="override out_dir"),
        max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="override optim.max_steps"),
        stop_after: int | None = typer.Option(
            None, "--stop-after", min=0, help="stop (with a checkpoint) after this step"
        ),
        quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
        evaluate_only: bool = typer.Option(
            False, "--evaluate-only", help="re-evaluate and re-export the latest checkpoint"
        ),
    ) -> None:
        """Prepare the data (PII scrub, dedup, split, data card), train, evaluate, export."""
        from steward.model.train import TrainConfig, evaluate_latest, run

        cfg = TrainConfig.from_yaml(config)
        if out_dir is not None:
            cfg.out_dir = out_dir
        if max_steps is not None:
            cfg.optim.max_steps = max_steps
        if evaluate_only:
            typer.echo(json.dumps(evaluate_latest(cfg), indent=2, default=float))
            return
        result = run(cfg, resume=resume, stop_after=stop_after, progress=not quiet)
        typer.echo(json.dumps(result, indent=2, default=float))
