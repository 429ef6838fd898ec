"""The committed built-in model: verified, within its limits, and the default for `steward generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from steward.model import Decoder
from steward.model.io import default_model_dir, load_model, verify_manifest

BUILTIN = Path(__file__).resolve().parents[1] / "models" / "builtin"


def test_builtin_is_the_default_and_verifies() -> None:
    assert default_model_dir().resolve() == BUILTIN.resolve() or "STEWARD_MODEL_DIR" in os.environ
    manifest = verify_manifest(BUILTIN)
    assert manifest["dtype"] == "bfloat16"
    assert manifest["parameters"] <= 10_000_000
    for name in manifest["files"]:
        assert (BUILTIN / name).stat().st_size <= 20 * 1024 * 1024, name
    assert {"MODEL_CARD.md", "DATA_CARD.md", "tokenizer.json"} <= set(manifest["files"])
    metrics = manifest["metrics"]
    assert metrics["heldout_perplexity"] > 1
    assert metrics["t0_classification"]["families"]  # per-family accuracy with its baseline
    assert manifest["data_sha256"]  # hashes of the data it was trained on


def test_builtin_generates_deterministically() -> None:
    model, tok = load_model(BUILTIN)
    assert isinstance(model, Decoder) and tok is not None and tok.has_chat_template
    cmd = [
        sys.executable,
        "-m",
        "steward.cli",
        "generate",
        "Tell me about the sea.",
        "--seed",
        "7",
        "--max-tokens",
        "30",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("STEWARD_MODEL_DIR", None)
    a = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    b = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert a.stderr == ""  # statistics only with --verbose
    assert json.loads((BUILTIN / "steward_config.json").read_text())["arch"] == "decoder"
