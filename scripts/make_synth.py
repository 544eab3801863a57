"""`make synth`: write the synthetic sounding-video set (AVSync15 layout + event sidecars)."""

from jointdit.cli import parser, run
from jointdit.config import load_config, repo_path, save_resolved
from jointdit.data.synthetic import generate


def main() -> None:
    args = parser(__doc__, "configs/demo/base.yaml").parse_args()
    cfg = load_config(args.config, args.overrides)
    root = repo_path(cfg.data.root)
    summary = generate(root, cfg.data, seed=cfg.data.synth.seed)
    save_resolved(cfg, root)
    splits = ", ".join(f"{n} {split}" for split, n in summary["splits"].items())
    print(
        f"synthetic set in {root}: {splits} clips ({summary['written']} written,"
        f" {summary['skipped']} already there) in {summary['seconds']} s"
    )
    print(f"classes: {', '.join(summary['classes'])}")
    print(f"lists: {root}/train.txt, {root}/test.txt; event sidecars: {root}/events/")


if __name__ == "__main__":
    run(main)
