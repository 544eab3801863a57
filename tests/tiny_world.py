"""A complete tiny world on disk for pipeline / UI / demo tests: random tiny codecs saved in the
pretrained layout, a few synthetic clips, their latent cache, and a 1-step checkpoint.

Everything is built with the real loaders and writers, so what the tests exercise is what
`make demo` runs, only smaller.
"""

from dataclasses import dataclass
from pathlib import Path

from jointdit.codecs.tiny import build_tiny_codecs, codecs_overrides, save_codecs
from jointdit.config import load_config
from jointdit.data.cache import cache_split
from jointdit.data.synthetic import generate
from jointdit.train import train

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TinyWorld:
    root: Path
    overrides: list[str]  # point any config at this world's data, codecs, cache and runs
    ckpt: Path  # a trained step_<N>/ folder
    refs: list[Path]  # cache meta JSONs of the val split


def build_tiny_world(root: Path, steps: int = 1) -> TinyWorld:
    root = Path(root)
    save_codecs(build_tiny_codecs(seed=0), root / "codecs")
    overrides = [
        f"data.root={root / 'synth'}",
        "data.synth.num_train=4",
        "data.synth.num_test=2",
        f"cache.dir={root / 'cache'}",
        *codecs_overrides(root / "codecs"),
        f"train.out_dir={root / 'ckpt'}",
        "train.init_from=",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        "train.tensorboard=false",
        "run.name=tiny",
    ]
    cfg = load_config(REPO / "configs" / "demo" / "stage_a.yaml", overrides)
    generate(root / "synth", cfg.data, seed=cfg.data.synth.seed, progress=False)
    for split in ("train", "val"):
        cache_split(cfg, split)
    result = train(cfg)
    refs = sorted((root / "cache" / "meta" / "val").glob("*.json"))
    return TinyWorld(root, overrides, result.last_checkpoint, refs)
