"""`steward scan`: run the guard pipeline over text and print the findings as JSON.

stdout carries exactly one JSON line per input and nothing else, so the output can be joined line
by line with the input file; logs and errors go to stderr. With --jsonl, lines are scanned in
batches so that the classifier's encoder runs on many texts at once; a line that cannot be read (not
JSON, nested too deeply, blank, a wrong field) gets `{"error": "line N: ..."}` in its place and the
rest of the file is still scanned. A leading UTF-8 byte-order mark is ignored. Exit status: 0 when
every input is allowed, 1 when any is blocked, 2 when any input (or the command itself) is in error.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import typer

if TYPE_CHECKING:  # the guard package loads torch: import it only when a scan runs
    from steward.guard.types import Role, ScanContext, Verdict

__all__ = ["register", "scan_jsonl", "verdict_json"]

ROLES = ("user", "document", "system")


def verdict_json(verdict: Verdict) -> dict[str, Any]:
    """The documented line: flagged, categories, scores, findings (offsets into the input)."""
    return {
        "flagged": verdict.flagged,
        "categories": verdict.categories,
        "scores": {k: round(v, 4) for k, v in verdict.scores.items()},
        "findings": [
            {
                "category": f.category,
                "entity": f.entity,
                "start": f.start,
                "end": f.end,
                "score": round(f.score, 4),
            }
            for f in verdict.findings
        ],
        "action": verdict.action.value,
        **({"errors": verdict.errors} if verdict.errors else {}),
    }


def _parse_line(line: str, lineno: int) -> tuple[str, Role, str | None]:
    if not line.strip():
        raise ValueError(f"line {lineno}: empty line")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {lineno}: not JSON: {exc.msg}") from None
    except RecursionError:
        raise ValueError(f"line {lineno}: not JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than the interpreter converts
        raise ValueError(f"line {lineno}: not JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f'line {lineno}: expected an object with a string "text"')
    role = obj.get("role", "user")
    if role not in ROLES:
        raise ValueError(f"line {lineno}: role must be one of {', '.join(ROLES)}, got {role!r}")
    system = obj.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise ValueError(f'line {lineno}: "system_prompt" must be a string')
    return obj["text"], cast("Role", role), system


def _batches(stream: TextIO, size: int) -> Iterator[list[tuple[int, str]]]:
    batch: list[tuple[int, str]] = []
    for lineno, line in enumerate(stream, 1):
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]  # a byte-order mark read by a plain utf-8 decoder is not part of the line
        batch.append((lineno, line))  # blank lines too: each input line gets its output line
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def scan_jsonl(pipeline: Any, stream: TextIO, out: TextIO, base: ScanContext, batch_size: int = 64) -> int:
    """Scan JSONL `stream` into `out`, one line per input in order; returns the exit status."""
    from dataclasses import replace

    status = 0
    for batch in _batches(stream, batch_size):
        parsed: list[tuple[str, Role, str | None] | str] = []
        for lineno, line in batch:
            try:
                parsed.append(_parse_line(line, lineno))
            except Exception as exc:  # whatever goes wrong with one line is that line's error
                message = " ".join(str(exc).split())
                if not (isinstance(exc, ValueError) and message.startswith(f"line {lineno}: ")):
                    message = f"line {lineno}: {type(exc).__name__}: {message or 'no detail'}"
                parsed.append(message)
        good = [p for p in parsed if isinstance(p, tuple)]
        contexts = [
            replace(base, role=r, system_prompt=base.system_prompt if sp is None else sp) for _, r, sp in good
        ]
        verdicts = iter(pipeline.scan_texts([t for t, _, _ in good], contexts, "input") if good else [])
        for p in parsed:
            if isinstance(p, str):
                out.write(json.dumps({"error": p}, ensure_ascii=False) + "\n")
                print(f"steward: error: {p}", file=sys.stderr)
                status = 2
                continue
            v = next(verdicts)
            out.write(json.dumps(verdict_json(v), ensure_ascii=False) + "\n")
            if v.errors:
                status = 2
            elif v.blocked and status == 0:
                status = 1
        out.flush()
    return status


def _scan_stdin(pipeline: Any, base: ScanContext, batch_size: int) -> int:
    """`scan_jsonl` over stdin decoded as the file is (utf-8-sig, undecodable bytes kept as
    surrogates); the wrapper is detached afterwards so that stdin itself stays open."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text-only stdin (replaced by the caller): read it as it is
        return scan_jsonl(pipeline, sys.stdin, sys.stdout, base, batch_size)
    stream = io.TextIOWrapper(buffer, encoding="utf-8-sig", errors="surrogateescape", newline="\n")
    try:
        return scan_jsonl(pipeline, stream, sys.stdout, base, batch_size)
    finally:
        stream.detach()


def register(app: typer.Typer) -> None:
    @app.command("scan")
    def scan_command(
        text: str | None = typer.Argument(
            None, metavar="TEXT", help="text to scan; '-' or omitted reads stdin"
        ),
        jsonl: Path | None = typer.Option(
            None,
            "--jsonl",
            help='file of {"text": ..., "role": ..., "system_prompt": ...} lines (- for stdin)',
            allow_dash=True,
        ),
        policy: Path | None = typer.Option(None, "--policy", help="policy YAML (default: built-in)"),
        tenant: str = typer.Option("default", "--tenant", help="tenant whose policy applies"),
        route: str = typer.Option("default", "--route", help="route whose policy applies"),
        role: str = typer.Option("user", "--role", help="user | document | system"),
        system_prompt: str | None = typer.Option(
            None,
            "--system-prompt",
            help="the system prompt the text is sent under (context_probe asks what it keeps secret)",
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="texts per encoder batch"),
    ) -> None:
        """Scan text with the guards; print findings as JSON (exit 0 allowed, 1 blocked, 2 error)."""
        from steward.guard.pipeline import Pipeline
        from steward.guard.types import ScanContext

        if role not in ROLES:
            raise ValueError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
        if jsonl is not None and text is not None:
            raise ValueError("give TEXT or --jsonl, not both")
        pipeline = Pipeline(policy)
        base = ScanContext(tenant=tenant, route=route, role=cast("Role", role), system_prompt=system_prompt)
        if jsonl is not None:
            if str(jsonl) == "-":
                status = _scan_stdin(pipeline, base, batch_size)
            else:
                if not jsonl.is_file():
                    raise FileNotFoundError(f"--jsonl file not found: {jsonl}")
                with jsonl.open(encoding="utf-8-sig", errors="surrogateescape", newline="\n") as fh:
                    status = scan_jsonl(pipeline, fh, sys.stdout, base, batch_size)
            raise typer.Exit(status)
        if text is None or text == "-":
            text = sys.stdin.read()
            text = text[:-1] if text.endswith("\n") else text
        verdict = pipeline.scan_text(text, base, "input")
        # One text: the line also names the policy applied and its version (the hash the gateway's
        # traces and audit records carry). --jsonl lines keep the documented keys only.
        out = {
            **verdict_json(verdict),
            "policy": verdict.policy_name,
            "policy_version": verdict.policy_version,
        }
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        if verdict.errors:
            print(f"steward: error: {verdict.explain()}", file=sys.stderr)
            raise typer.Exit(2)
        raise typer.Exit(1 if verdict.blocked else 0)
