"""Print the memory planner's table for a config and a GPU budget (GPU_GB, default 48).

No GPU and no download needed: without checkpoints/pretrained/ the published architectures are
built from the configs shipped in jointdit/assets/real_configs/.
"""

import os

from jointdit.cli import parser, run
from jointdit.config import load_config
from jointdit.launch import plan_report


def main() -> int:
    args = parser(__doc__, "configs/stage_b.yaml").parse_args()
    cfg = load_config(args.config, args.overrides)
    print(plan_report(cfg, args.overrides, os.environ))
    return 0


if __name__ == "__main__":
    run(main)
