"""make probe CKPT=...: does a checkpoint use the other modality? Matched vs swapped partners.

For each cached clip of a split (default val), each modality's denoising loss at fixed levels
t is measured beside its own partner modality and beside another same-class clip's; a model
whose joint attention carries timing has a lower matched loss (gain > 0). See jointdit/probe.py.
"""

import json
import os
from pathlib import Path

from jointdit.cli import parser, run
from jointdit.errors import UserError
from jointdit.probe import format_rows, probe_checkpoint


def _levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or not all(0 < t < 1 for t in levels):
        raise UserError(f"--levels {text!r}: expected comma-separated numbers in (0, 1)")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], default_config=None)
    p.add_argument("--ckpt", default=os.environ.get("CKPT", ""), help="step or run folder ($CKPT)")
    p.add_argument("--split", default="val", help="cache split to probe (default val)")
    p.add_argument(
        "--levels", default="0.3,0.45,0.6", help="unified times t (default 0.3,0.45,0.6)"
    )
    p.add_argument(
        "--partner",
        choices=("level", "clean"),
        default="level",
        help="the partner modality at the same level t (default) or clean (as v2a / a2v give it)",
    )
    p.add_argument("--repeats", type=int, default=4, help="noise draws per clip and level")
    p.add_argument("--max-clips", type=int, default=64, help="at most this many clips (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward")
    p.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.config or args.overrides:
        given = f"CFG={args.config}" if args.config else f"ARGS={' '.join(args.overrides)}"
        raise UserError(
            f"{given}: make probe takes no config or overrides (it runs the checkpoint's own "
            "config); use --split, --levels, --partner, --repeats, --max-clips, --batch-size, --json"
        )
    if not args.ckpt:
        raise UserError("CKPT is not set: make probe CKPT=checkpoints/<run>[/step_<N>]")
    if args.repeats < 1 or args.batch_size < 1:
        raise UserError("--repeats and --batch-size must be at least 1")
    try:
        rows, info = probe_checkpoint(
            args.ckpt,
            args.split,
            _levels(args.levels),
            args.repeats,
            args.max_clips,
            args.batch_size,
            partner_clean=args.partner == "clean",
        )
    except UserError as e:
        raise UserError(f"CKPT={args.ckpt}: {e}") from None
    print(
        f"{info['checkpoint']}: {info['clips']} {info['split']} clips, {info['repeats']} draws,"
        f" partner {info['partner']}"
    )
    print(format_rows(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**info, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run(main)
