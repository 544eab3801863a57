"""make eval-avsync15 CKPT=...: JointDiT and its cascade baseline on a test split, per protocol.

Generates the split's windows (resumable) for both, scores them with every metric whose
weights are placed under eval.weights_dir (one skip line for each that is not), and prints the
paper-style table with bootstrap intervals and the paired joint - cascade contrast. Writes
<eval.out_dir>/<run>/<step>/results.json. CFG defaults to configs/asva_eval.yaml (ASVA's
protocol on AVSync15); docs/evaluation.md has the metrics and where their weights come from.
"""

from jointdit.cli import parser, run
from jointdit.config import load_config
from jointdit.evaluation.benchmark import evaluate_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0], default_config="configs/asva_eval.yaml")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides, make_vars={"CKPT": "infer.ckpt"})
    results = evaluate_checkpoint(cfg, cfg.infer.ckpt)
    p = results["protocol"]
    print(
        f"\n{results['checkpoint']}: {results['n_clips']} clips of {results['n_videos']} "
        f"{p['split']} videos; protocol {results['protocol_hash']} ({p['frames']} frames at "
        f"{p['fps']:g} fps, {p['height']}x{p['width']}, {p['sample_rate']} Hz, "
        f"{p['clips_per_video']} per video); 95% bootstrap intervals over clips\n"
    )
    print(results["table"])
    print(f"\nwrote {results['run_dir'] / 'results.json'}")
    return 0


if __name__ == "__main__":
    run(main)
