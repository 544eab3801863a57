"""Inference: conditions -> JointCFG sampling -> chunked decode -> out.mp4, preview.png, meta.json.

The checkpoint carries its resolved training config, so the model size, the codecs and the
diffusion settings at inference are exactly the ones it was trained with.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors import SafetensorError, safe_open

from jointdit import media
from jointdit.checkpoint import list_checkpoints, load_model, load_tensors
from jointdit.codecs import Codecs, load_codecs
from jointdit.config import AUDIO_PROMPT, frame_hw, portable_path, repo_path, save_resolved, to_dict
from jointdit.data.cache import check_version
from jointdit.diffusion import MODES, GuidanceWeights, JointDiffusion
from jointdit.errors import UserError

# The resolved config of a generation, next to its outputs. Not `config.yaml`: that name belongs
# to checkpoints, caches and datasets, and an output folder must never shadow one.
USED_CONFIG = "infer_config.yaml"


@dataclass
class Request:
    """One generation. Either `ref` (a cache meta JSON) or `image` must be given."""

    out_dir: Path
    ref: str = ""
    image: str = ""
    prompt: str = ""  # empty: the reference's caption (or no text with IMAGE alone)
    neg_prompt: str = ""
    steps: int = 25
    seed: int = 7  # seeds the video's noise and the audio's alike, as each expert's pipeline
    weights: GuidanceWeights = field(default_factory=GuidanceWeights)
    mode: str = "joint"
    iso: bool = False
    video: str = ""  # v2a: a clip whose picture is kept (default: the reference's)
    audio: str = ""  # a2v: a clip or wav whose sound is kept (default: the reference's)
    given: str = "auto"  # v2a/a2v: the given modality "noised" | "clean" | "auto" (clean if
    # the checkpoint was trained with clean partners, diffusion.p_indep_t > 0)
    decode_chunk: int = 0  # 0: the checkpoint config's codecs.video_decode_chunk (0 there: whole)


@dataclass
class Result:
    out_dir: Path
    video_path: Path
    preview_path: Path
    meta: dict


# What a cache entry must hold to be used as a reference (see jointdit/data/cache.py).
_REF_TENSORS = ("video_mean", "audio_mean", "first_frame", "image_emb", "text_emb", "text_mask")


def _reference_meta(path: str) -> tuple[dict, Path]:
    """A cache meta JSON (checked) and the path of its tensors file
    (meta/<split>/<id>.json <-> <split>/<id>.safetensors)."""
    meta_path = Path(path)
    if not meta_path.is_file():
        raise UserError(f"REF={path}: no such cache meta file (make cache-val writes them)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError):  # UnicodeDecodeError is a ValueError
        raise UserError(f"REF={path}: not a JSON file (expected a cache meta JSON)") from None
    if not isinstance(meta, dict) or "clip_id" not in meta:
        raise UserError(f"REF={path}: not a cache meta JSON (an object with clip_id, fps, ...)")
    try:
        check_version(meta, meta_path)
    except UserError as e:
        raise UserError(f"REF={e}") from None
    if len(meta_path.parents) < 3:
        raise UserError(f"REF={path}: not inside a cache (<cache>/meta/<split>/<clip>.json)")
    tensor_path = meta_path.parents[2] / meta_path.parent.name / f"{meta_path.stem}.safetensors"
    if not tensor_path.is_file():
        raise UserError(f"REF={path}: its cache entry {tensor_path} is missing; re-run the cache")
    return meta, tensor_path


def _check_reference(path: str) -> None:
    """REF's meta JSON and its tensors file (header and length only: no tensor is read)."""
    _, tensor_path = _reference_meta(path)
    try:
        with safe_open(str(tensor_path), "pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"REF={path}: {tensor_path} is not a readable safetensors file ({e})"
        ) from None
    missing = [k for k in _REF_TENSORS if k not in keys]
    if missing:
        raise UserError(f"REF={path}: {tensor_path} lacks {', '.join(missing)}; re-run the cache")


def _reference(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A cache meta JSON and its tensors."""
    _check_reference(path)
    meta, tensor_path = _reference_meta(path)
    return meta, load_tensors(tensor_path.parent, tensor_path.name)


def _read_image(path: str) -> torch.Tensor:
    """A picture (3,H,W) in [-1,1] at its own size."""
    try:
        with Image.open(path) as raw:
            img = raw.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UserError(f"IMAGE={path}: not a readable image file") from None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def check_out_dir(out: str | Path) -> Path:
    """The output folder of a request, checked before any work: not a file, not inside a
    checkpoint (its config.yaml and weights are never overwritten), in a writable place."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if existing.is_file():
        raise UserError(f"OUT={out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"OUT={out}: {existing} is not writable")
    for p in (existing, *existing.parents):
        if (p / "state.json").is_file() or (p == out and list_checkpoints(p)):
            raise UserError(
                f"OUT={out}: {p} is a checkpoint folder; write the outputs elsewhere "
                "(e.g. OUT=outputs/infer)"
            )
    return out


def check_request(req: Request) -> None:
    """Every file a request names, checked before the model runs (one line names the bad one)."""
    if req.mode not in MODES:
        raise UserError(f"MODE={req.mode!r} is not known; accepted: {', '.join(MODES)}")
    if not req.ref and not req.image:
        raise UserError("give REF=<cache meta json> or IMAGE=<picture> to generate from")
    if req.steps < 1:
        raise UserError(f"STEPS={req.steps}: accepted: an integer >= 1")
    check_out_dir(req.out_dir)
    if req.ref:
        _check_reference(req.ref)
    if req.image:
        _read_image(req.image)
    for var, path in (("VIDEO", req.video), ("AUDIO", req.audio)):
        if path:
            try:
                media.check_readable(path, video=var == "VIDEO")
            except UserError as e:  # its text starts with the path: named once
                raise UserError(f"{var}={path}: {str(e).removeprefix(f'{path}: ')}") from None


def render_preview(frames: torch.Tensor, mel: torch.Tensor, path: Path, n: int = 8) -> Path:
    """A strip of `n` evenly spaced frames over the log-mel spectrogram, as one PNG."""
    idx = torch.linspace(0, frames.shape[0] - 1, min(n, frames.shape[0])).round().long()
    strip = torch.cat(list(((frames[idx] + 1) * 127.5).clamp(0, 255).byte()), dim=2)  # (3,H,nW)
    width = strip.shape[2]
    spec = mel.T.flip(0).float()  # (bins, frames), low frequencies at the bottom
    spec = (spec - spec.min()) / (spec.max() - spec.min() + 1e-8)
    spec_img = Image.fromarray((spec.numpy() * 255).astype(np.uint8)).resize(
        (width, max(64, width // 4)), Image.BILINEAR
    )
    # a simple dark-blue -> yellow colour ramp keeps quiet and loud parts apart
    s = np.asarray(spec_img, dtype=np.float32)[..., None] / 255.0
    ramp = np.concatenate([s * 255, s * 220, (1 - s) * 90 + s * 40], axis=-1).astype(np.uint8)
    top = strip.permute(1, 2, 0).numpy()
    canvas = np.concatenate([top, ramp], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


class Generator:
    """Holds a checkpoint's model, codecs and diffusion; `generate` writes one clip."""

    def __init__(self, ckpt: str, device: str | None = None, ema: bool = True):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        model, cfg, ckpt_dir = load_model(ckpt, ema=ema, device=device)
        self.ema = ema
        self._setup(model, cfg, str(ckpt_dir), device)
        self.load_s = time.perf_counter() - t0

    @classmethod
    def for_model(
        cls, model, cfg, label: str = "(in training)", codecs: Codecs | None = None
    ) -> Generator:
        """A Generator around a live model (training previews): no checkpoint is read.
        `codecs`: codecs already in memory (`make gpu-check`), instead of cfg.codecs' folders."""
        self = cls.__new__(cls)
        self.ema = False  # the live (raw) weights
        t0 = time.perf_counter()
        self._setup(model, cfg, label, next(model.parameters()).device.type, codecs)
        self.load_s = time.perf_counter() - t0
        return self

    def _setup(self, model, cfg, ckpt: str, device: str, codecs: Codecs | None = None) -> None:
        self.model, self.cfg, self.ckpt, self.device = model, cfg, ckpt, device
        self.codecs = codecs or load_codecs(cfg.codecs, device=device)
        self.diffusion = JointDiffusion(cfg.diffusion)

    def _conditions(self, req: Request, generator: torch.Generator) -> tuple[dict, dict, dict]:
        """(cond batch of 1, given latents, clip info) for a request. The picture to animate
        (IMAGE, VIDEO's first frame for v2a) is conditioned as SVD's pipeline does it: CLIP on
        the whole picture, the first-frame latent of the picture noised in pixel space with
        `generator` (the video's, drawn before its initial noise). A REF's comes from its cache
        (the draw seed % first_frame_draws of its noise-augmented encodings)."""
        d, codecs = self.cfg.data, self.codecs
        ref_meta, ref = _reference(req.ref) if req.ref else ({}, {})
        if not req.ref and not req.image:
            raise UserError("give REF=<cache meta json> or IMAGE=<picture> to generate from")
        info = {
            k: ref_meta[k]
            for k in ("clip_id", "class", "caption", "family", "events", "event_frames")
            if k in ref_meta
        }
        fps = float(ref_meta.get("fps", d.fps))
        num_frames = int(ref_meta.get("frames", media.frame_count(d.duration, fps)))
        audio_frames = (
            ref["audio_mean"].shape[1]
            if ref
            else round(d.duration * self.cfg.model.audio_latent_rate)
        )
        max_t = self.cfg.memory.max_t
        if 0 < max_t < num_frames:  # the same crop the training data used
            audio_frames = math.ceil(audio_frames * max_t / num_frames)
            num_frames = max_t
        given: dict[str, torch.Tensor] = {}
        picture = None  # (whole picture, the same cropped to the clip's frame)
        if req.mode == "v2a" and req.video:
            clip = media.read_clip(
                req.video, fps, frame_hw(d.size), d.sample_rate, duration=d.duration
            )
            given["video"] = codecs.video.encode(clip.frames)[0][:num_frames]
            picture = (clip.frames[0], clip.frames[0])
        elif req.image:
            whole = _read_image(req.image)
            picture = (whole, media.resize_crop(whole, frame_hw(d.size)))
        if req.mode == "v2a" and "video" not in given:
            if not ref:
                raise UserError("MODE=v2a needs VIDEO=<clip> or REF=<cache meta json>")
            given["video"] = ref["video_mean"][:num_frames]
        if req.mode == "a2v":
            if req.audio:
                wave = media.read_audio(req.audio, d.sample_rate, duration=d.duration)
                given["audio"] = codecs.audio.encode(wave)[0][:, :audio_frames]
            elif ref:
                given["audio"] = ref["audio_mean"][:, :audio_frames]
            else:
                raise UserError("MODE=a2v needs AUDIO=<clip or wav> or REF=<cache meta json>")
        if picture is not None:
            first_latent = codecs.video.encode_first_frame(
                picture[1], self.cfg.diffusion.cond_aug, generator
            )
            image_emb = codecs.cond.image(picture[0])
        else:
            draws = ref["first_frame"]
            first_latent, image_emb = draws[req.seed % draws.shape[0]], ref["image_emb"]
        caption = req.prompt or ref_meta.get("caption", "")
        if req.prompt or not ref:
            text_emb, text_mask = (t[0] for t in codecs.cond.text([req.prompt]))
            info["caption"] = req.prompt
        else:
            text_emb, text_mask = ref["text_emb"], ref["text_mask"]
        cond = {
            "first_frame": first_latent,
            "image_emb": image_emb,
            "text_emb": text_emb,
            "text_mask": text_mask,
        }
        if self.model.audio_context == "audioldm2":
            cond |= self._audio_prompt(caption, ref if not req.prompt else {})
        if req.weights.wnt:
            neg_emb, neg_mask = (t[0] for t in codecs.cond.text([req.neg_prompt]))
            cond |= {"neg_text_emb": neg_emb, "neg_text_mask": neg_mask}
            if self.model.audio_context == "audioldm2":
                neg = self._audio_prompt(caption, {}, negative=req.neg_prompt)
                cond |= {f"neg_{k}": neg[f"null_{k}"] for k in AUDIO_PROMPT}
        cond = {k: v[None].to(self.device) for k, v in cond.items()}
        given = {k: v[None].to(self.device) for k, v in given.items()}
        info |= {
            "fps": fps,
            "num_frames": num_frames,
            "audio_frames": audio_frames,
            "duration": num_frames / fps,
            "sample_rate": int(d.sample_rate),
        }
        return cond, given, info

    def _audio_prompt(self, caption: str, ref: dict, negative: str = "") -> dict:
        """AudioLDM2's prompt encoding of the caption and of the empty prompt (or `negative`),
        from the reference's cache entry when it holds the caption's, else encoded now."""
        keys = [*AUDIO_PROMPT, *(f"null_{k}" for k in AUDIO_PROMPT)]
        if ref and all(k in ref for k in keys):
            return {k: ref[k] for k in keys}
        if self.codecs.prompt is None:
            raise UserError(
                "this checkpoint's audio expert reads AudioLDM2's prompt encoding "
                "(model.audio_context=audioldm2) but its config sets no codecs.audio_prompt "
                "folder; `make fetch-models` downloads it"
            )
        return self.codecs.prompt.encode(caption, negative=negative)

    def sample(
        self, req: Request, progress: Callable[[int, int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict, dict[str, float]]:
        """The request's final latents, video (T,4,h,w) and audio (8,t,16) (scaled like the
        cache), its clip info and timings."""
        timings: dict[str, float] = {"load_s": self.load_s}
        t0 = time.perf_counter()
        # One generator per expert, both seeded with SEED, so that a fresh model's sample is
        # SVD's and AudioLDM2's pipelines' at that seed.
        generators = tuple(torch.Generator(self.device).manual_seed(req.seed) for _ in "va")
        cond, given, info = self._conditions(req, generators[0])
        timings["conditions_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        video, audio = self.diffusion.sample(
            self.model,
            cond,
            info["num_frames"],
            info["audio_frames"],
            req.steps,
            req.weights,
            generator=generators,
            mode=req.mode,
            given_video=given.get("video"),
            given_audio=given.get("audio"),
            iso=req.iso,
            progress=progress,
            given=req.given,
        )
        timings["sample_s"] = time.perf_counter() - t0
        return video[0], audio[0], info, timings

    def decode(
        self, video: torch.Tensor, audio: torch.Tensor, info: dict, chunk: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> frames (T,3,H,W) in [-1,1] (the whole clip at once unless `chunk` or the
        codecs' video_decode_chunk says otherwise) and the waveform, as the pipelines decode."""
        frames = self.codecs.video.decode(video, chunk=chunk or None)
        num_samples = round(info["duration"] * info["sample_rate"])
        return frames, self.codecs.audio.decode(audio, num_samples)

    def generate(self, req: Request, progress: Callable[[int, int], None] | None = None) -> Result:
        check_request(req)
        video, audio, info, timings = self.sample(req, progress)
        t0 = time.perf_counter()
        frames, wave = self.decode(video, audio, info, req.decode_chunk)
        wave = wave.clamp(-1, 1)
        timings["decode_s"] = time.perf_counter() - t0

        out = Path(req.out_dir)
        video_path = media.write_mp4(
            out / "out.mp4", frames, info["fps"], wave, info["sample_rate"]
        )
        preview = render_preview(frames, self.codecs.audio.mel(wave), out / "preview.png")
        meta = {
            **info,
            "mode": req.mode,
            "given_level": "clean" if self.diffusion.given_is_clean(req.given) else "noised",
            "iso": req.iso,
            "checkpoint": str(self.ckpt),
            "request": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(req).items()},
            "timings": timings,
        }
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(out / "meta.json")
        save_resolved(self.used_config(req), out, name=USED_CONFIG)
        return Result(out, video_path, preview, meta)

    def used_config(self, req: Request) -> DictConfig:
        """The checkpoint's config (model, codecs, cache, diffusion, memory as loaded) with the
        `infer` section this request actually ran with."""
        tree = to_dict(self.cfg)
        w = req.weights
        tree["infer"].update(
            ckpt=portable_path(self.ckpt),
            ref=portable_path(req.ref) if req.ref else "",
            image=portable_path(req.image) if req.image else "",
            prompt=req.prompt,
            neg_prompt=req.neg_prompt,
            mode=req.mode,
            video=portable_path(req.video) if req.video else "",
            audio=portable_path(req.audio) if req.audio else "",
            iso=req.iso,
            out=portable_path(req.out_dir),
            decode_chunk=req.decode_chunk,
            ema=self.ema,
            steps=req.steps,
            seed=req.seed,
            wv=w.wv,
            wa=w.wa,
            wi=w.wi,
            wi_first=w.wi if w.wi_first is None else w.wi_first,
            wt=w.wt,
            wnt=w.wnt,
        )
        return OmegaConf.create(tree)


def weights_from_config(c) -> GuidanceWeights:
    """The JointCFG weights of an `infer` config section."""
    return GuidanceWeights(wv=c.wv, wa=c.wa, wi=c.wi, wt=c.wt, wnt=c.wnt, wi_first=c.wi_first)


def sampling_groups(weights: GuidanceWeights) -> dict[str, dict]:
    """Request settings of the groups compared clip by clip: "joint" (JointDiT), "iso" (the
    cascade baseline: joint attention off and its guidance terms zero, i.e. the two experts
    side by side) and "v2a" (the reference's picture kept, its sound generated)."""
    no_joint = replace(weights, wv=0.0, wa=0.0)
    return {
        "joint": dict(mode="joint", iso=False, weights=weights),
        "iso": dict(mode="joint", iso=True, weights=no_joint),
        "v2a": dict(mode="v2a", iso=False, weights=weights),
    }


def request_from_config(c) -> Request:
    """A Request from the `infer` config section (paths resolved against the repo root)."""

    def path(p: str) -> str:
        return str(repo_path(p)) if p else ""

    if c.mode not in MODES:
        raise UserError(f"MODE={c.mode!r} is not known; accepted: {', '.join(MODES)}")
    return Request(
        out_dir=repo_path(c.out),
        ref=path(c.ref),
        image=path(c.image),
        prompt=c.prompt,
        neg_prompt=c.neg_prompt,
        steps=c.steps,
        seed=c.seed,
        weights=weights_from_config(c),
        mode=c.mode,
        iso=c.iso,
        video=path(c.video),
        audio=path(c.audio),
        decode_chunk=c.decode_chunk,
    )


class TrainingPreview:
    """`train(preview=...)`: every `train.preview_every` steps, sample the first validation
    reference with the live model into <run>/previews/step_<N>/ (out.mp4 + preview.png)."""

    def __init__(self):
        self.generator: Generator | None = None

    def __call__(self, model, cfg, out_dir: Path, step: int) -> None:
        refs = sorted((repo_path(cfg.cache.dir) / "meta" / "val").glob("*.json"))
        if not refs:
            return  # nothing cached for validation yet: `make cache-val`
        if self.generator is None:
            self.generator = Generator.for_model(model, cfg)
        was_training = model.training
        model.eval()
        try:
            inf = cfg.infer
            self.generator.generate(
                Request(
                    out_dir=Path(out_dir) / f"step_{step}",
                    ref=str(refs[0]),
                    steps=inf.steps,
                    seed=inf.seed,
                    weights=weights_from_config(inf),
                )
            )
        finally:
            model.train(was_training)
