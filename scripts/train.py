"""Train JointDiT: `make train CFG=...`, or through `make final-train-a|b` (memory-aware)."""

import sys

import torch

from jointdit.cli import parser, run
from jointdit.config import load_config


def main() -> int:
    p = parser("Train JointDiT; re-running the same command resumes.", "configs/stage_a.yaml")
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even though the config fingerprint changed",
    )
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)

    from jointdit.pipeline import TrainingPreview
    from jointdit.train import train

    try:
        result = train(cfg, force_resume=args.force_resume, preview=TrainingPreview())
    except torch.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"out of memory: {first}", file=sys.stderr)
        return 3  # scripts/final_train.py turns this into advice on the next knob
    print(
        f"run {result.run_dir}: step {result.step}, {result.samples_seen} samples, "
        f"{result.samples_per_s:.2f} samples/s; latest checkpoint {result.last_checkpoint}"
    )
    return 0


if __name__ == "__main__":
    run(main)
