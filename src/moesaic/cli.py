"""`moesaic <command>`: a table of typed, documented functions; no logic lives in the parser.

Each command module exposes plain functions; `COMMANDS` maps a subcommand name to one.
Add a command by writing the function in its own module and adding one line here.
"""

from __future__ import annotations

import typer

from moesaic.commands import export, generate, info, quickstart, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="moesaic: sparse Mixture-of-Experts language models.")

COMMANDS = {
    "info": info.info,
    "quickstart": quickstart.quickstart,
    "train": train.train,
    "export": export.export,
    "generate": generate.generate,
    "chat": generate.chat,
}

for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def main() -> None:
    """Run the CLI; a ValueError (bad input) becomes a one-line message and exit status 2."""
    try:
        app(standalone_mode=True)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
