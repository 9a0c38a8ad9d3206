"""The `hi-jax` command: `hi-jax COMMAND [--flags]`, one absl program per command."""

from __future__ import annotations

import importlib
import sys

from absl import app

COMMANDS = {
    "profile": ("experiments.profile", "harm-information profile of one policy"),
    "demo": ("experiments.demo", "shallow versus deep alignment, end to end"),
    "sweep": ("experiments.sweep", "equilibrium scaling sweep over lambda, mu, gamma"),
}


def usage() -> str:
    lines = ["usage: hi-jax COMMAND [--config=FILE] [--config.FIELD=VALUE ...]", "",
             "commands:"]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `hi-jax COMMAND --helpfull` for the flags of a command."]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"hi-jax: unknown command {command!r}; expected one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[command][0])
    app.run(module.main, argv=[f"hi-jax {command}"] + argv[2:])


if __name__ == "__main__":
    run()
