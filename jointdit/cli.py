"""Shared plumbing for the thin scripts in scripts/: argument parsing and error reporting."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from jointdit.errors import UserError


def parser(description: str, default_config: str | None) -> argparse.ArgumentParser:
    """An argparse parser with the `--config` option and trailing `key=value` overrides."""
    p = argparse.ArgumentParser(description=description)
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


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
