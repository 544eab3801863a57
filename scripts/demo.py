"""`make demo [LONG=1]`: the main job on the embedded synthetic default (no network, no GPU)."""

import os

from jointdit.cli import parser, run
from jointdit.config import load_config
from jointdit.errors import UserError


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "configs/demo/demo.yaml").parse_args(argv)
    long_var = os.environ.get("LONG", "")
    if long_var not in ("", "0", "1"):
        raise UserError(f"LONG={long_var!r}: accepted values are 0 and 1")
    long = long_var == "1"
    cfg = load_config(args.config, args.overrides)

    from jointdit.demo import run_demo

    run_demo(cfg, long=long, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    run(main)
