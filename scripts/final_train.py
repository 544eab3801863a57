"""Train through the memory-aware wrapper: detect GPUs, plan memory levers, run scripts/train.py.

Environment: NUM_GPUS, GPU_GB, ACCELERATE_CONFIG, FORCE_KEEP_USER_ENVS=1 (keep set JOINTDIT_*).
"""

import os

from jointdit.cli import parser, run
from jointdit.launch import final_train
from jointdit.processes import LAUNCHER_PID_VAR


def main() -> int:
    args = parser(__doc__, "configs/stage_a.yaml").parse_args()
    # the training processes watch this process and stop when it goes, SIGKILL included
    env = {**os.environ, LAUNCHER_PID_VAR: str(os.getpid())}
    return final_train(args.config, args.overrides, env=env)


if __name__ == "__main__":
    run(main)
