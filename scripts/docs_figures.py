"""make docs-figures [DIR=...]: the demo's pictures and figures for README and docs/.

From an evaluated demo run (DIR, default: the demo's newest), writes into --out (docs/assets/)
demo_events.png (joint and iso clips of one reference per event family, with the detected
visual events and sound onsets), demo_sync.png (sync vs chance per group and family) and
demo_metrics.json (the scores without the per-clip rows; the README's table is tested against
it), then prints the README's table.
"""

import json
import os
from argparse import ArgumentParser
from pathlib import Path

from jointdit.cli import run
from jointdit.config import load_config, repo_path
from jointdit.errors import UserError


def _default_dir() -> Path:
    """The demo's newest evaluated Stage B checkpoint (`make demo` samples it)."""
    cfg = load_config(repo_path("configs/demo/demo.yaml"), env={})
    folder = repo_path(cfg.demo.out_dir) / cfg.run.name
    runs = sorted(
        folder.glob("step_*/metrics.json"),
        key=lambda p: int(p.parent.name.removeprefix("step_")),
    )
    if not runs:
        raise UserError(f"DIR is not set and {folder} holds no evaluated run: make demo")
    return runs[-1].parent


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/assets", help="folder for the pictures and figures")
    args = p.parse_args(argv)
    from jointdit.demo import headline
    from jointdit.figures import event_strip, strip_rows, sync_plot

    root = Path(os.environ["DIR"]) if os.environ.get("DIR") else _default_dir()
    source = root / "metrics.json"
    if not source.is_file():
        raise UserError(f"DIR={root}: no metrics.json in it (make eval DIR={root} writes it)")
    metrics = json.loads(source.read_text())
    assets = repo_path(args.out)
    written = [
        event_strip(strip_rows(metrics, ["joint", "iso"]), assets / "demo_events.png"),
        sync_plot(metrics, assets / "demo_sync.png"),
    ]
    summary = {
        "groups": {
            name: {k: v for k, v in stats.items() if k != "clips"}
            for name, stats in metrics["groups"].items()
        },
        "contrasts": metrics["contrasts"],
    }
    (assets / "demo_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    for path in [*written, assets / "demo_metrics.json"]:
        print(f"wrote {path}")
    print()
    print(headline(summary))
    return 0


if __name__ == "__main__":
    run(main)
