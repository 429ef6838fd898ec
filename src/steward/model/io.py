"""Saving and loading Steward models: safetensors weights, a config, the tokenizer, a SHA-256 manifest.

Layout of a model directory:
    steward_config.json   TransformerConfig
    model*.safetensors    weights (shards no larger than `max_shard_bytes`; tied heads stored once)
    tokenizer.json        byte-level BPE
    manifest.json         {"files": {name: sha256}, ...metadata}: checked on load, so a weight file
                          that changed on disk is refused rather than served silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, TransformerConfig
from .tokenizer import Tokenizer
from .transformer import Decoder, Encoder, build_model

CONFIG_NAME = "steward_config.json"
MANIFEST_NAME = "manifest.json"


class ModelLoadError(RuntimeError):
    pass


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_dir() -> Path:
    """`$STEWARD_MODEL_DIR`, else the repository's committed `models/builtin/`."""
    env = os.environ.get("STEWARD_MODEL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "models" / "builtin"


def save_model(
    model: Decoder | Encoder,
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 20_000_000,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]  # the same tensor as embed.token.weight
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    for old in out.glob("model*.safetensors"):
        old.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    model.config.save(out / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save(out)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    manifest: dict[str, Any] = {
        "format": "steward-model/1",
        "files": {name: sha256_file(out / name) for name in files},
        "parameters": model.num_parameters(),
        "dtype": str(dtype or next(model.parameters()).dtype).replace("torch.", ""),
        "config": model.config.to_dict(),
    }
    if metadata:
        manifest.update(metadata)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(f"{directory}: no {MANIFEST_NAME}; refusing unverifiable weights")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: malformed manifest ({exc})") from exc
    for name, digest in files.items():
        f = Path(directory) / name
        if not f.is_file():
            raise ModelLoadError(f"{directory}: file {name} listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise ModelLoadError(f"{directory}: SHA-256 of {name} does not match the manifest")
    return manifest


def load_model(
    directory: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> tuple[Decoder | Encoder, Tokenizer | None]:
    """Load a Steward model directory (the built-in model by default), verified against its manifest."""
    d = Path(directory) if directory is not None else default_model_dir()
    if not d.is_dir():
        raise ModelLoadError(f"model directory not found: {d}")
    if not (d / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{d}: no {CONFIG_NAME} (not a Steward model directory)")
    if verify:
        verify_manifest(d)
    try:
        cfg = TransformerConfig.load(d / CONFIG_NAME)
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from exc
    shards = sorted(d.glob("model*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{d}: no model*.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        state.update(load_file(str(s)))
    # Built on the meta device and filled by assignment: no random initialisation, no second copy
    # of the weights (peak memory is what a serving worker is sized by).
    with torch.device("meta"):
        model = build_model(cfg)
    tied = cfg.tie_embeddings and cfg.arch == "decoder"
    if tied:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(
            {k: v.to(torch.float32).contiguous() for k, v in state.items()}, strict=False, assign=True
        )
    except RuntimeError as exc:  # torch reports shape mismatches as RuntimeError
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelLoadError(f"{d}: weight shape mismatch: {first}") from exc
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.lm_head.weight = model.embed.token.weight  # type: ignore[union-attr]
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover and not missing:
        missing = leftover
    if missing or unexpected:
        raise ModelLoadError(
            f"{d}: weights do not match the config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    model.to(dtype).eval()
    return model, Tokenizer.from_dir(d)
