"""Train JointDiT: `make train CFG=...`, or through `make final-train-a|b` (memory-aware)."""

from jointdit.cli import parser, run
from jointdit.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = parser("Train JointDiT; re-running the same command resumes.", "configs/stage_a.yaml")
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even though the config fingerprint changed",
    )
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    from jointdit.train import train

    preview = None
    if cfg.train.preview_every:  # the inference stack is imported only when it is used
        from jointdit.pipeline import TrainingPreview

        preview = TrainingPreview()
    # an out-of-memory error exits with code 3 (jointdit/cli.py), which scripts/final_train.py
    # turns into advice on the next knob
    result = train(cfg, force_resume=args.force_resume, preview=preview)
    if result.rank == 0:  # one summary per run
        print(
            f"run {result.run_dir}: step {result.step}, {result.samples_seen} samples, "
            f"{result.samples_per_s:.2f} samples/s; latest checkpoint {result.last_checkpoint}"
        )
    return 0


if __name__ == "__main__":
    run(main)
