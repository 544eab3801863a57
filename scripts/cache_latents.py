"""Encode a dataset split to the latent cache (make cache-train / make cache-val).

Shard across processes with `accelerate launch` or `torchrun`: each process takes every
WORLD_SIZE-th clip starting at RANK, so no two processes write the same file.
"""

import os
import sys

from jointdit.cli import parser, run
from jointdit.config import load_config
from jointdit.data.cache import SPLITS, cache_split
from jointdit.errors import UserError


def _env_int(var: str, default: int, low: int) -> int:
    """RANK / WORLD_SIZE (set by torchrun or accelerate) as an integer >= low."""
    text = os.environ.get(var, "")
    try:
        value = int(text) if text else default
    except ValueError:
        value = low - 1
    if value < low:
        raise UserError(f"{var}={text!r} is malformed; accepted: an integer >= {low}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], "configs/avsync15.yaml")
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--overwrite", action="store_true", help="re-encode clips already cached")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank, world = _env_int("RANK", 0, 0), _env_int("WORLD_SIZE", 1, 1)
    report = cache_split(cfg, args.split, overwrite=args.overwrite, rank=rank, world=world)
    print(report.summary())
    if report.failed:
        print(
            f"failures (clip, source, reason) in {cfg.cache.dir}/failures/{args.split}.rank{rank}.tsv"
        )
    if report.failed_frac > cfg.cache.max_fail_frac:
        print(
            f"error: {report.failed_frac:.1%} of clips failed, above cache.max_fail_frac="
            f"{cfg.cache.max_fail_frac}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    run(main)
