"""The planner's count against torch's own MemTracker on the same simulated training step, at
the published size, rung by rung up to the planner's pick for the smallest budget; a markdown
table per stage (docs/memory.md). `--check` exits 1 when a rung is off by more than 5 %.

No GPU and no download needed: it runs on the meta device (minutes per rung on a CPU).
"""

import argparse

from jointdit.cli import run
from jointdit.config import load_config
from jointdit.memory import budget_for_gb, format_tracker_table, tracker_table

TOLERANCE = 0.05


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--configs", nargs="+", default=["configs/stage_a.yaml", "configs/stage_b.yaml"])
    p.add_argument("--gpu-gb", nargs="+", type=float, default=[48.0, 24.0])
    p.add_argument("--check", action="store_true", help=f"exit 1 beyond {TOLERANCE:.0%}")
    args = p.parse_args()
    picks = {f"{gb:g} GB": budget_for_gb(gb) for gb in args.gpu_gb}
    worst = 0.0
    for path in args.configs:
        rows = tracker_table(load_config(path), min(picks.values()))
        print(format_tracker_table(path, rows, picks) + "\n", flush=True)
        worst = max([worst, *(abs(r.error) for r in rows)])
    print(f"largest difference: {100 * worst:.2f} %")
    return 1 if args.check and worst > TOLERANCE else 0


if __name__ == "__main__":
    run(main)
