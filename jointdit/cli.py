"""Shared plumbing for the thin scripts in scripts/: argument parsing and error reporting.

Exit codes: 0 done, 2 bad input (a UserError or a bad argument: one line naming the value),
1 failure at run time (one line; JOINTDIT_DEBUG=1 shows the traceback), 3 out of memory,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from jointdit.errors import UserError

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OOM = 2, 1, 3


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a UserError) instead of usage + message."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (--help lists the arguments)")


def parser(description: str, default_config: str | None) -> ArgumentParser:
    """An argparse parser with the `--config` option and trailing `key=value` overrides."""
    p = ArgumentParser(description=description)
    p.add_argument(
        "--config",
        default=default_config,
        help=f"YAML config (default: {default_config})",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides in dotted form, e.g. train.lr=1e-4 (highest precedence)",
    )
    return p


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# A launcher (accelerate launch, torchrun) exits 1 whatever its children's codes were; a child
# run with this variable set also appends its exit code, one line, to the file it names.
EXIT_FILE_VAR = "JOINTDIT_EXIT_FILE"


def _exit(code: int) -> None:
    path = os.environ.get(EXIT_FILE_VAR)
    if path:
        with open(path, "a") as f:
            f.write(f"{code}\n")
    sys.exit(code)


def _say(line: str) -> None:
    """An error line on stderr, from rank 0 only: the processes of one run fail alike, and one
    line per run is enough (every process still exits with its code)."""
    rank = os.environ.get("RANK", "")
    if not (rank.isdigit() and int(rank) > 0):  # a malformed RANK is reported, not obeyed
        print(line, file=sys.stderr)


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main(); every failure becomes one line on stderr and an exit code."""
    try:
        code = main()
    except UserError as e:
        _say(f"error: {' '.join(str(e).split())}")
        _exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _say("interrupted")
        _exit(130)
    except Exception as e:
        if os.environ.get("JOINTDIT_DEBUG") == "1":
            raise
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(e, torch.OutOfMemoryError):
            _say(f"out of memory: {_first_line(e)}")
            _exit(EXIT_OOM)
        _say(f"error: {type(e).__name__}: {_first_line(e)} (JOINTDIT_DEBUG=1 shows the traceback)")
        _exit(EXIT_FAILED)
    _exit(code or 0)
