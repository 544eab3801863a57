"""`make demo`: the whole job on the embedded synthetic default, no network, no GPU.

synthetic set -> tiny codecs -> latent cache -> Stage A -> Stage B -> sample held-out
references (joint, iso, v2a) -> sync metrics beside shuffled chance. Every step re-uses what
an earlier run finished: the set and the cache skip existing clips, training resumes, samples
that exist are kept.
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from jointdit.config import load_config, portable_path, repo_path
from jointdit.errors import UserError

# The demo's result in a few lines (README's table): each row what it measures and where
# metrics.json holds it (a group's score minus chance, or a paired contrast over all clips).
HEADLINE = (
    ("joint: sync - shuffled chance", "groups", "joint"),
    ("joint - iso (same picture and seed)", "contrasts", "joint - iso"),
    ("v2a: sync - shuffled chance", "contrasts", "v2a - chance"),
    ("iso (no joint attention): sync - shuffled chance", "groups", "iso"),
)


def headline(metrics: dict) -> str:
    """The demo's result as a Markdown table, from what `make eval` saved (metrics.json):
    the sync differences that say whether sound and picture agree, with 95 % intervals."""
    from jointdit.metrics import markdown_table

    rows = []
    for label, kind, name in HEADLINE:
        if kind == "groups":
            stats = metrics["groups"][name]["sync_gap"]
        else:  # per family, and "all" where the group mixes families
            per_family = metrics["contrasts"][name]
            stats = per_family.get("all") or next(iter(per_family.values()))
            stats = stats["sync"]
        lo, hi = stats["ci95"]
        rows.append([label, f"{stats['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"])
    head = [f"the demo ({metrics['groups']['joint']['n']} held-out clips per group)"]
    return "\n".join(markdown_table([*head, "sync difference [95% CI]"], rows))


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _stage_cfg(path: str, long: bool, factor: int, overrides: list[str]) -> DictConfig:
    cfg = load_config(repo_path(path), overrides)
    if long:  # a separate, longer run: never mixes with the short run's checkpoints
        cfg.run.name = f"{cfg.run.name}_long"
        cfg.train.max_steps = cfg.train.max_steps * factor
    return cfg


def _codecs_ready(cfg: DictConfig) -> bool:
    """The tiny codecs exist and cleared their quality bars (`make tiny-models` writes that);
    a UserError if they were trained from another recipe (an older version or other settings)."""
    from jointdit.codecs.tiny import recipe

    out = cfg.codecs.tiny.out_dir
    quality = repo_path(out) / "quality.json"
    if not quality.is_file():
        return False
    report = json.loads(quality.read_text())
    if report.get("passed") is not True:
        return False
    if report.get("recipe") != recipe(cfg.codecs.tiny):
        raise UserError(
            f"{out} holds tiny codecs trained from another recipe (an older version of this repo "
            f"or other codecs.tiny settings): delete it and {cfg.cache.dir} (the latents they "
            "wrote) to train new ones, or set codecs.tiny.out_dir and cache.dir elsewhere"
        )
    return True


def run_demo(cfg: DictConfig, long: bool = False, overrides: list[str] | None = None) -> dict:
    from jointdit.codecs.tiny_train import train_tiny_codecs
    from jointdit.data.cache import cache_split
    from jointdit.data.synthetic import generate
    from jointdit.metrics import evaluate_dir, format_table
    from jointdit.pipeline import Generator, Request, sampling_groups, weights_from_config
    from jointdit.train import train

    overrides = list(overrides or [])
    d = cfg.demo
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        _say(f"{name} done in {timings[name]} s")

    t0 = time.perf_counter()
    summary = generate(repo_path(cfg.data.root), cfg.data, seed=cfg.data.synth.seed)
    _say(f"synthetic set: {summary['splits']} in {cfg.data.root}")
    step("synth", t0)

    t0 = time.perf_counter()
    if _codecs_ready(cfg):
        _say(f"tiny codecs already in {cfg.codecs.tiny.out_dir}")
    else:
        report = train_tiny_codecs(cfg)
        _say("tiny codecs: " + ", ".join(f"{k}={v:.3g}" for k, v in report.items()))
    step("tiny_codecs", t0)

    t0 = time.perf_counter()
    for split in ("train", "val"):
        rep = cache_split(cfg, split)
        _say(rep.summary())
        if rep.failed_frac > cfg.cache.max_fail_frac:
            raise UserError(f"caching {split} failed for {rep.failed_frac:.0%} of clips")
    step("cache", t0)

    ckpts = {}
    for stage, path in (("stage_a", d.stage_a), ("stage_b", d.stage_b)):
        t0 = time.perf_counter()
        scfg = _stage_cfg(path, long, d.long_factor, overrides)
        if stage == "stage_b":  # Stage B starts from the Stage A run just trained
            # repo-relative, as configs store paths: the run resumes wherever the repo lives
            scfg.train.init_from = portable_path(ckpts["stage_a"].parent)
        result = train(scfg)
        ckpts[stage] = result.last_checkpoint
        resumed_done = result.samples_per_s != result.samples_per_s  # nan: nothing left to do
        rate = "already finished" if resumed_done else f"{result.samples_per_s:.1f} samples/s"
        _say(f"{stage}: step {result.step} ({rate}) -> {result.last_checkpoint}")
        step(stage, t0)

    t0 = time.perf_counter()
    gen = Generator(str(ckpts["stage_b"]))
    refs = sorted((repo_path(cfg.cache.dir) / "meta" / "val").glob("*.json"))[: d.num_samples]
    out_root = repo_path(d.out_dir) / ckpts["stage_b"].parent.name / ckpts["stage_b"].name
    inf = cfg.infer
    groups = sampling_groups(weights_from_config(inf))
    # Each clip draws its own noise (seed + index). With one seed for all, an event time the
    # sampler draws from the noise would be the same in every clip, and the shuffled chance
    # would equal the score whatever the model does.
    for group, settings in groups.items():
        for i, ref in enumerate(refs):
            out = out_root / group / ref.stem
            if (out / "meta.json").is_file():
                continue
            seed = inf.seed + i
            gen.generate(Request(out_dir=out, ref=str(ref), steps=inf.steps, seed=seed, **settings))
        _say(f"sampled {len(refs)} {group} clips into {out_root / group}")
    step("sample", t0)

    t0 = time.perf_counter()
    results = evaluate_dir(out_root, cfg)
    table = format_table(results)
    step("eval", t0)
    total = round(time.perf_counter() - t_start, 1)
    print()
    print(table)
    print()
    print(headline(json.loads((out_root / "metrics.json").read_text())))
    print()
    _say(f"clips: {out_root}/<joint|iso|v2a>/<clip>/out.mp4 (+ preview.png, meta.json)")
    _say(f"metrics: {out_root / 'metrics.json'}")
    _say(f"does the model read the other modality yet? make probe CKPT={ckpts['stage_b']}")
    _say(f"total {total} s; per step: {timings}")
    return {"results": results, "out_dir": out_root, "timings": timings, "total_s": total}
