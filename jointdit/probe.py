"""`make probe`: does a checkpoint use the other modality yet? A minute on cached clips.

Sampling and `make eval` answer "are sound and picture in sync?"; this answers the question
before it: does joint attention carry anything across modalities? For every cached clip of a
split, each modality's denoising loss is measured at fixed levels t and fixed noise twice:
beside the clip's own partner modality ("matched") and beside the partner of another clip of
the same class ("swapped": the same kind of content at other instants). A model that reads the
other modality's timing has a lower matched loss; one that ignores it gives the same number
twice. Joint attention switched off ("iso") is reported too, as the loss without any partner.

The gain is (swapped - matched) / matched in percent, per family (or class) and level, with
the spread over clips as a 95% bootstrap interval.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from jointdit.config import repo_path
from jointdit.data.cache import LatentDataset
from jointdit.diffusion import JointDiffusion
from jointdit.errors import UserError
from jointdit.metrics import bootstrap_ci


def swap_partners(groups: list[str]) -> list[int]:
    """For clip i, another clip of its group (the next one, cyclically); a clip alone in its
    group is paired with the next clip overall. Needs at least two clips."""
    if len(groups) < 2:
        raise UserError("the probe needs at least two cached clips in the split")
    partners = []
    for i, g in enumerate(groups):
        same = [j for j, h in enumerate(groups) if h == g]
        partners.append(
            same[(same.index(i) + 1) % len(same)] if len(same) > 1 else (i + 1) % len(groups)
        )
    return partners


@torch.no_grad()
def coupling(
    model,
    cfg: DictConfig,
    items: list[dict],
    groups: list[str],
    levels: list[float],
    repeats: int,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    partner_clean: bool = False,
) -> dict[float, dict[str, np.ndarray]]:
    """Per-clip losses by level: {t: {"video_matched", "video_swapped", "video_iso", "audio_…"}}.

    `items` are LatentDataset items, `groups` each clip's class. The swapped variant keeps the
    clip's noise and replaces only the other modality's clean latents by its partner's; every
    loss is averaged over `repeats` noise draws, the same draws for all variants. The partner
    sits at the same level t, or with `partner_clean` at level 0 (what v2a / a2v give).
    """
    from jointdit.train import collate

    diffusion = JointDiffusion(cfg.diffusion)
    partners = swap_partners(groups)
    keys = [f"{m}_{k}" for m in ("video", "audio") for k in ("matched", "swapped", "iso")]
    out = {float(t): {k: np.zeros(len(items)) for k in keys} for t in levels}
    chunks = [
        list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)
    ]
    for chunk in tqdm(chunks, desc="probe", unit="batch"):
        batch = _to(collate([items[i] for i in chunk]), device)
        other = _to(collate([items[partners[i]] for i in chunk]), device)
        with_other_audio = {**batch, "audio": other["audio"]}
        with_other_video = {**batch, "video": other["video"]}
        n = len(chunk)
        no = torch.zeros(n, dtype=torch.bool, device=device)
        # (batch, iso, clean video, clean audio) -> [(key, which loss)]: matched, iso (no
        # partner at all), video beside another audio, audio beside another video.
        if partner_clean:
            variants = [
                (batch, no, no, ~no, [("video_matched", 0)]),
                (batch, no, ~no, no, [("audio_matched", 1)]),
                (batch, ~no, no, no, [("video_iso", 0), ("audio_iso", 1)]),
                (with_other_audio, no, no, ~no, [("video_swapped", 0)]),
                (with_other_video, no, ~no, no, [("audio_swapped", 1)]),
            ]
        else:
            variants = [
                (batch, no, no, no, [("video_matched", 0), ("audio_matched", 1)]),
                (batch, ~no, no, no, [("video_iso", 0), ("audio_iso", 1)]),
                (with_other_audio, no, no, no, [("video_swapped", 0)]),
                (with_other_video, no, no, no, [("audio_swapped", 1)]),
            ]
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + chunk[0])
        for t in levels:
            tt = torch.full((n,), float(t), device=device)
            for _ in range(repeats):
                noise = [
                    torch.randn(batch[k].shape, generator=g, device=device)
                    for k in ("video", "audio")
                ]
                for b, iso, clean_v, clean_a, wanted in variants:
                    t_v = torch.where(clean_v, 0.0, tt)
                    t_a = torch.where(clean_a, 0.0, tt)
                    got = diffusion.per_sample_loss(
                        model, b, t_v, t_a, *noise, clean_v, clean_a, no, no, iso
                    )
                    for key, which in wanted:
                        out[float(t)][key][chunk] += got[which].float().cpu().numpy() / repeats
    return out


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def summarize(
    per_clip: dict[float, dict[str, np.ndarray]], families: list[str], n_boot: int = 1000
) -> list[dict]:
    """Rows (family, t, modality, matched, swapped, iso, gain % with its 95% interval)."""
    rng = np.random.default_rng(0)
    rows = []
    fams = np.array(families)
    for fam in sorted(set(families)) + (["all"] if len(set(families)) > 1 else []):
        keep = np.ones(len(fams), bool) if fam == "all" else fams == fam
        for t, cols in per_clip.items():
            for m in ("video", "audio"):
                matched, swapped, iso = (
                    cols[f"{m}_{k}"][keep] for k in ("matched", "swapped", "iso")
                )
                gain = 100 * (swapped - matched) / np.maximum(matched.mean(), 1e-12)
                stats = bootstrap_ci({"gain": gain}, n_boot, rng)["gain"]
                rows.append(
                    {
                        "family": fam,
                        "t": t,
                        "modality": m,
                        "n": int(keep.sum()),
                        "matched": float(matched.mean()),
                        "swapped": float(swapped.mean()),
                        "iso": float(iso.mean()),
                        "gain_pct": stats["mean"],
                        "gain_ci95": stats["ci95"],
                    }
                )
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (
        "| family | t | modality | N | loss matched | loss swapped | loss iso | gain % [95% CI] |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lo, hi = r["gain_ci95"]
        lines.append(
            f"| {r['family']} | {r['t']:.2f} | {r['modality']} | {r['n']} | {r['matched']:.4f} "
            f"| {r['swapped']:.4f} | {r['iso']:.4f} | {r['gain_pct']:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


def probe_checkpoint(
    ckpt: str,
    split: str,
    levels: list[float],
    repeats: int,
    max_clips: int,
    batch_size: int,
    device: str | None = None,
    partner_clean: bool = False,
) -> tuple[list[dict], dict]:
    """Load a checkpoint (EMA weights) and probe it on `split` of the cache it was trained on."""
    from jointdit.checkpoint import load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, ckpt_dir = load_model(ckpt, device=device)
    ds = LatentDataset(repo_path(cfg.cache.dir), split, latents=cfg.train.latents)
    count = min(len(ds), max_clips) if max_clips > 0 else len(ds)
    torch.manual_seed(0)  # LatentDataset draws latents from the cached (mean, std)
    items = [ds[i] for i in tqdm(range(count), desc=f"read {split}", unit="clip", leave=False)]
    metas = [ds.meta(i) for i in range(count)]
    groups = [str(m.get("class", m["clip_id"])) for m in metas]
    families = [str(m.get("family") or m.get("class", "all")) for m in metas]
    per_clip = coupling(
        model, cfg, items, groups, levels, repeats, batch_size, device, partner_clean=partner_clean
    )
    info = {
        "checkpoint": str(ckpt_dir),
        "split": split,
        "clips": count,
        "repeats": repeats,
        "partner": "clean" if partner_clean else "same level",
    }
    return summarize(per_clip, families), info
