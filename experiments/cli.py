"""The `hi-jax` command: `hi-jax COMMAND [--flags]`, one absl program per command."""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    # ml_collections reports an unknown field as the quoted field name alone.
    bare = text.strip("\"'")
    if isinstance(error, (AttributeError, KeyError)) and bare.isidentifier():
        return f"unknown config field {bare!r}"
    return text


# Errors of config files and flags: a missing file, a file without
# get_config, a syntax error, an unknown field or a value of the wrong type.
_CONFIG_ERRORS = (flags.Error, AttributeError, KeyError, ImportError, OSError, TypeError,
                  ValueError, SyntaxError)


def _exit_invalid_config(command: str, error: BaseException):
    print(f"hi-jax {command}: invalid flags or config: {_one_line(error)}",
          file=sys.stderr)
    sys.exit(2)


def _parse_flags(command: str):
    def parse(argv):
        try:
            remaining = flags.FLAGS(argv)
            # config_flags loads the file lazily; reading it raises any load error.
            if "config" in flags.FLAGS:
                flags.FLAGS["config"].value.to_dict()
            return remaining
        except _CONFIG_ERRORS as error:
            _exit_invalid_config(command, error)
    return parse


def _define_flags(default_config: str) -> None:
    """Defines --config, --workdir and --overwrite for the chosen command."""
    config_flags.DEFINE_config_file(
        "config", default_config,
        "Path of an ml_collections config file; override fields with "
        "--config.FIELD=VALUE.", lock_config=True)
    flags.DEFINE_string("workdir", None,
                        "Run directory to write; default: a new directory under runs/.")
    flags.DEFINE_bool("overwrite", False,
                      "Replace the result files of an existing run directory.")


class _DropOrbaxInfo(std_logging.Filter):
    """Filter that drops orbax-checkpoint's INFO lines (about 250 per demo) and keeps its warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or f"{os.sep}orbax{os.sep}" not in record.pathname)


def _guarded(command: str, main):
    def run_main(argv):
        logging.get_absl_handler().addFilter(_DropOrbaxInfo())
        try:
            main(argv, flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.overwrite)
        except (ValueError, TypeError, OSError, FloatingPointError) as error:
            logging.error("hi-jax %s failed: %s", command, error)
            print(f"hi-jax {command}: error: {_one_line(error)}", file=sys.stderr)
            sys.exit(1)
    return run_main


def run(argv: list[str] | None = None) -> None:
    """Entry point of the console script.

    Invalid flags or config files exit with status 2, and invalid values
    found before the work starts (ValueError, TypeError, an existing or
    unwritable run directory) or a NaN during training exit with status 1. Either way the
    command prints one line naming the problem to stderr.
    """
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
    try:
        # Defining the config flag already applies the --config.FIELD overrides.
        _define_flags(module.DEFAULT_CONFIG)
    except _CONFIG_ERRORS as error:
        _exit_invalid_config(command, error)
    app.run(_guarded(command, module.main), argv=[f"hi-jax {command}"] + argv[2:],
            flags_parser=_parse_flags(command))


if __name__ == "__main__":
    run()
