"""`steward generate PROMPT`: complete one prompt with a local model.

stdout carries the completion and nothing else (plus one newline), so the command composes in
pipelines; statistics go to stderr with --verbose. Parameter checking is left to `GenerationConfig`
so that the CLI, the library and the gateway refuse the same requests with the same messages.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from steward.model.tokenizer import Tokenizer
    from steward.model.transformer import Decoder


def load_decoder(directory: Path) -> tuple[Decoder, Tokenizer]:
    """A Steward model directory (steward_config.json) or a Hugging Face one (config.json)."""
    from steward.model.io import CONFIG_NAME, ModelLoadError, load_model
    from steward.model.transformer import Decoder

    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    if (directory / CONFIG_NAME).is_file():
        model, tokenizer = load_model(directory)
    elif (directory / "config.json").is_file():
        from steward.model.hf import from_hf, load_hf_tokenizer

        model = from_hf(directory)
        tokenizer = load_hf_tokenizer(directory)
        model.eval()
    else:
        raise ModelLoadError(
            f"{directory}: neither {CONFIG_NAME} (Steward) nor config.json (Hugging Face) found"
        )
    if not isinstance(model, Decoder):
        raise ModelLoadError(f"{directory}: holds an encoder; text generation needs a decoder model")
    if tokenizer is None:
        raise ModelLoadError(f"{directory}: no tokenizer files; cannot turn text into tokens")
    return model, tokenizer


# Library parameter -> the option that sets it, so an error names what the user actually typed.
_FLAGS = {
    "max_new_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "stop": "--stop",
    "seed": "--seed",
}


def _not_utf8(where: str, exc: UnicodeDecodeError | UnicodeEncodeError) -> ValueError:
    bad = exc.object[exc.start : exc.end]
    shown = bad.hex() if isinstance(bad, bytes) else bad.encode("utf-8", "surrogateescape").hex()
    return ValueError(f"the prompt ({where}) is not valid UTF-8: byte 0x{shown[:2]} at offset {exc.start}")


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None and prompt != "-":
        # Python hands undecodable argv bytes on as lone surrogates, which no tokenizer takes.
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _not_utf8("argument", exc) from None
        return prompt
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        text = sys.stdin.read()
    else:
        try:
            text = buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8("stdin", exc) from None
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode stdin reads it
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _not_utf8("stdin", exc) from None
    # `echo ... | steward generate` appends a newline the user did not mean as part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_command(
        prompt: str | None = typer.Argument(
            None, metavar="PROMPT", help="the prompt; '-' or omitted reads it from stdin"
        ),
        seed: int | None = typer.Option(None, "--seed", help="sampling seed (same seed, same text)"),
        max_tokens: int = typer.Option(64, "--max-tokens", help="most tokens to generate"),
        temperature: float = typer.Option(1.0, "--temperature", help="0 = greedy"),
        top_k: int = typer.Option(0, "--top-k", help="sample from the k most likely tokens (0 = off)"),
        top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling mass (1 = off)"),
        stop: list[str] | None = typer.Option(None, "--stop", help="stop before this text (repeatable)"),
        model_dir: Path | None = typer.Option(
            None, "--model", help="model directory (default: the built-in model)"
        ),
        raw: bool = typer.Option(False, "--raw", help="complete the text as is, no chat template"),
        streaming: bool = typer.Option(False, "--stream", help="print text as it is generated"),
        verbose: bool = typer.Option(False, "--verbose", help="statistics on stderr"),
    ) -> None:
        """Generate a completion; stdout gets only the generated text."""
        # torch is imported here, not at module level: `steward --help` should not pay seconds for it.
        from steward.model.generate import (
            Completion,
            GenerationConfig,
            GenerationError,
            generate,
            stream,
        )
        from steward.model.io import default_model_dir

        cfg = GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=list(stop or []),
            seed=seed,
        )
        try:
            cfg.validate()  # before loading a model: a typo should not cost a model load
        except GenerationError as exc:
            flag = next((f for name, f in _FLAGS.items() if str(exc).startswith(name)), None)
            raise GenerationError(f"{flag}: {exc}" if flag else str(exc)) from None
        text = _read_prompt(prompt)
        t0 = time.perf_counter()
        model, tokenizer = load_decoder(model_dir if model_dir is not None else default_model_dir())
        # The prompt is text: "<|end|>" typed in it is not the control token (no forged turns, no
        # early end of text). Control tokens come only from the chat template.
        if not raw and tokenizer.has_chat_template:
            ids = tokenizer.encode_chat([{"role": "user", "content": text}])
        else:
            ids = tokenizer.encode_text(text)
        t1 = time.perf_counter()
        first: float | None = None
        if streaming:
            finish, n_prompt, n_out = "length", 0, 0
            for delta in stream(model, tokenizer, ids, cfg):
                if first is None:
                    first = time.perf_counter()
                if delta.text:
                    typer.echo(delta.text, nl=False)
                n_prompt, n_out = delta.prompt_tokens, delta.completion_tokens
                finish = delta.finish_reason or finish
            typer.echo("")
        else:
            done: Completion = generate(model, tokenizer, [ids], cfg)[0]
            typer.echo(done.text)
            finish, n_prompt, n_out = done.finish_reason, done.prompt_tokens, done.completion_tokens
        t2 = time.perf_counter()
        if verbose:
            rate = n_out / (t2 - t1) if t2 > t1 else 0.0
            ttft = f" first_delta={first - t1:.3f}s" if first is not None else ""
            typer.echo(
                f"prompt_tokens={n_prompt} completion_tokens={n_out} finish_reason={finish} "
                f"load={t1 - t0:.2f}s generate={t2 - t1:.2f}s{ttft} tokens/s={rate:.1f}",
                err=True,
            )
