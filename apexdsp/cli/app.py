"""Root of the ``apexdsp`` command: mounts the command groups and turns user errors into one line.

User errors (:class:`apexdsp.errors.ApexError`) print ``error: <message>`` on stderr and exit with
status 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from apexdsp.paths import configure_environment

configure_environment()

from apexdsp.errors import ApexError  # noqa: E402

app = typer.Typer(
    name="apexdsp",
    help="Compile multi-hop QA search agents written as DSPy programs; track every run in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _mount() -> None:
    """Import the command groups (kept lazy in their own modules so ``--help`` stays fast)."""
    from apexdsp.cli import ask_cmd, compile_cmd, data_cmd, eval_cmd, index_cmd, lm_cmd, setup_cmd, store_cmd
    from apexdsp.cli import compare_cmd, run_cmd, serve_cmd

    app.add_typer(lm_cmd.app, name="lm")
    app.add_typer(data_cmd.app, name="data")
    app.add_typer(index_cmd.app, name="index")
    app.add_typer(setup_cmd.app, name="setup")
    eval_cmd.register(app)
    compile_cmd.register(app)
    ask_cmd.register(app)
    store_cmd.register(app)
    run_cmd.register(app)
    compare_cmd.register(app)
    serve_cmd.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    _mount()
    try:
        app(args=argv, standalone_mode=False)
    except ApexError as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return error.exit_code
    except SystemExit as exit_:  # typer/click exits on --help and usage errors
        return int(exit_.code or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            return error.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
