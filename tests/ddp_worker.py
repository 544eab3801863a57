"""Run by test_train under torchrun: train a few steps, then record this rank's weights."""

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from jointdit.config import load_config
from jointdit.train import train

out = Path(sys.argv[1])
result = train(load_config(overrides=sys.argv[2:]))
rank, world = dist.get_rank(), dist.get_world_size()
checksums = {
    name: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest()
    for name, p in result.model.named_parameters()
}
(out / f"rank{rank}.json").write_text(json.dumps({"world": world, "checksums": checksums}))
