"""The `steward` command.

Each subcommand lives in `steward.commands.<name>` and registers itself on the shared Typer app, so
capabilities add commands without editing one long file. `main()` turns every expected failure (bad
input, bad config, missing file) into one line on stderr and a non-zero exit; set STEWARD_DEBUG=1 to
see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="steward",
    help="Steward: responsible LLM development and deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from steward.commands import audit, generate, guard, keys, scan, serve, train

    generate.register(app)
    train.register(app)
    serve.register(app)
    keys.register(app)
    audit.register(app)
    guard.register(app)
    scan.register(app)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("steward: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, RuntimeError, OSError, LookupError, ArithmeticError) as exc:
        if os.environ.get("STEWARD_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"steward: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
