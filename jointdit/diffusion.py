"""Unified time, training losses, the sampler and JointCFG (DESIGN sections 4 and 5).

One unified time t in [0, 1] per sample drives both experts, each in its own
parameterisation. The mapping is written once, in `UnifiedTime`:

    video (SVD, EDM):     sigma(t) = (sigma_max^(1/rho) t + sigma_min^(1/rho) (1 - t))^rho
                          network input c_in x with c_in = 1/sqrt(sigma^2 + 1),
                          c_noise = ln(sigma)/4, v-prediction (sigma_data = 1)
    audio (AudioLDM2):    n(t) = floor(t (N - 1)) on its DDPM betas, epsilon prediction
                          (or, for an audio model trained from scratch, `audio_prediction: v`:
                          v = sqrt(ab) eps - sqrt(1 - ab) x0, ab = alpha_bar(n))

t = 1 is (near) pure noise for both, t = 0 the cleanest level; training draws t uniformly.
Sampling walks each expert's own ladder, one step of both per model call, so that a fresh
model samples what each expert's diffusers pipeline samples:

    video: SVD's Euler on the Karras ladder, t_k = 1 - k/(S - 1) (sigma_max ... sigma_min),
           then one Euler step to sigma 0 (`EulerDiscreteScheduler`, use_karras_sigmas)
    audio: AudioLDM2's DDIM on its timesteps n_k (`DDIMScheduler.set_timesteps`, eta 0), each
           read as t = (n_k + 1/2) / (N - 1), the middle of its bin; the last step lands on
           alpha_bar(0), as DDIM's does (set_alpha_to_one false)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from jointdit.config import AUDIO_PROMPT
from jointdit.errors import UserError

MODES = ("joint", "v2a", "a2v")
# How v2a / a2v hold the given modality: at its noised ground truth on the sampler's own
# schedule, or clean (level 0, what a model trained with p_indep_t > 0 has learned to read).
GIVEN_LEVELS = ("auto", "noised", "clean")


@dataclass
class GuidanceWeights:
    """JointCFG weights (DESIGN section 5); 0 removes that branch."""

    wv: float = 0.0  # joint vs iso, video
    wa: float = 0.0  # joint vs iso, audio
    wi: float = 0.0  # image condition: audio, and video's last frame
    wt: float = 0.0  # text condition
    wnt: float = 0.0  # away from the negative prompt
    wi_first: float | None = None  # video's first frame (None: wi); SVD's ramp runs linearly
    # from its min_guidance_scale - 1 on the first frame to max_guidance_scale - 1 on the last

    def image_ramp(self, frames: int) -> Tensor:
        """The image weight of each video frame (frames,): wi_first rising linearly to wi."""
        first = self.wi if self.wi_first is None else self.wi_first
        return torch.linspace(first, self.wi, frames)

    @property
    def image(self) -> bool:
        return bool(self.wi or self.wi_first)


class UnifiedTime:
    """The one mapping from unified time t to each expert's noise level and inputs."""

    def __init__(self, cfg):
        self.sigma_min = float(cfg.video_sigma_min)
        self.sigma_max = float(cfg.video_sigma_max)
        self.rho = float(cfg.video_rho)
        # AudioLDM2's scheduler (betas, timestep ladder), reused from diffusers, not re-derived.
        self.ddim = DDIMScheduler(
            num_train_timesteps=cfg.audio_num_train_timesteps,
            beta_start=cfg.audio_beta_start,
            beta_end=cfg.audio_beta_end,
            beta_schedule=cfg.audio_beta_schedule,
            set_alpha_to_one=False,
            steps_offset=cfg.audio_steps_offset,
            timestep_spacing=cfg.audio_timestep_spacing,
            clip_sample=False,
        )
        self.alphas_cumprod = self.ddim.alphas_cumprod.clone()
        self.num_audio_steps = cfg.audio_num_train_timesteps
        self.audio_prediction = cfg.audio_prediction

    def video_sigma(self, t: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi * t + lo * (1 - t)) ** self.rho

    def audio_index(self, t: Tensor) -> Tensor:
        return torch.floor(t * (self.num_audio_steps - 1)).long()

    def audio_alpha_bar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod.to(t.device)[self.audio_index(t)]

    def audio_time(self, index: Tensor) -> Tensor:
        """The unified time of DDPM index n: the middle of its bin, so audio_index gives n back."""
        return (index.double() + 0.5) / (self.num_audio_steps - 1)

    def ladders(self, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """Each expert's sampling ladder for `steps` model calls: the video's unified times
        (steps,) (sigma(t) = SVD's Karras sigmas), the audio's (steps,) (AudioLDM2's DDIM
        timesteps), and the audio alpha_bar each DDIM step lands on (steps,), the last one
        alpha_bar(0). Float64; the video's last step goes to sigma 0."""
        t_video = torch.linspace(1.0, 0.0, max(steps, 2), dtype=torch.float64)[:steps]
        self.ddim.set_timesteps(steps)
        index = self.ddim.timesteps.long()
        prev = index - self.num_audio_steps // steps
        landing = torch.where(
            prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.ddim.final_alpha_cumprod
        )
        return t_video, self.audio_time(index), landing.double()

    # --- noising (forward process) -------------------------------------------------------
    def noise_video(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return x0 + _bcast(self.video_sigma(t), x0) * noise

    def noise_audio(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        ab = _bcast(self.audio_alpha_bar(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    # --- network inputs ------------------------------------------------------------------
    def network_inputs(self, x_video: Tensor, x_audio: Tensor, t_video: Tensor, t_audio: Tensor):
        """Model keyword arguments for noisy latents at levels t_video / t_audio (B,)."""
        sigma = self.video_sigma(t_video)
        return {
            "video": x_video / _bcast((sigma**2 + 1).sqrt(), x_video),  # c_in
            "audio": x_audio,
            "video_timestep": sigma.log() / 4,  # c_noise
            "audio_timestep": self.audio_index(t_audio),
            "video_t": t_video,
            "audio_t": t_audio,
        }

    # --- network outputs -> clean estimates ----------------------------------------------
    def video_denoised(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """EDM denoiser D = c_skip x + c_out F for v-prediction with sigma_data = 1."""
        s = _bcast(self.video_sigma(t), x)
        return x / (s**2 + 1) - v * s / (s**2 + 1).sqrt()

    def audio_denoised(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The clean audio estimate from the network's output `out` (epsilon or v)."""
        ab = _bcast(self.audio_alpha_bar(t), x)
        if self.audio_prediction == "v":
            return ab.sqrt() * x - (1 - ab).sqrt() * out
        return (x - (1 - ab).sqrt() * out) / ab.sqrt()

    def audio_noise(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The noise estimate (what DDIM steps along) from the network's output."""
        if self.audio_prediction == "v":
            ab = _bcast(self.audio_alpha_bar(t), x)
            return (1 - ab).sqrt() * x + ab.sqrt() * out
        return out

    def audio_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the audio network is trained to output for x0 noised with `noise` at t."""
        if self.audio_prediction == "v":
            ab = _bcast(self.audio_alpha_bar(t), x0)
            return ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return noise


def event_weights(x0: Tensor, time_dim: int, strength: float) -> Tensor:
    """Per-latent loss weights (the shape of x0) that favour what changes over time: 1 +
    strength * |x0 - its mean over time_dim| / (that distance's mean over the sample).

    In float64, with a floor relative to the sample's magnitude, so that a static clip gets
    weight 1 everywhere instead of amplified round-off.
    """
    x = x0.double()
    dev = (x - x.mean(time_dim, keepdim=True)).abs()
    floor = 1e-3 * x.abs().flatten(1).mean(1) + 1e-12
    scale = torch.maximum(dev.flatten(1).mean(1), floor)
    return (1 + strength * dev / _bcast(scale, dev)).to(torch.float32)


def _weighted_mean(err: Tensor, w: Tensor) -> Tensor:
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _rand(shape, generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randn_like(x: Tensor, generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def text_inputs(src: dict, prefix: str = "", audio_prefix: str | None = None) -> dict:
    """The model's text keyword arguments from a batch or condition dict: CLIP tokens under
    `prefix` (the joint context), the audio expert's prompt under `audio_prefix` (default:
    `prefix`) where the dict has it."""
    audio_prefix = prefix if audio_prefix is None else audio_prefix
    out = {"text_emb": src[f"{prefix}text_emb"], "text_mask": src[f"{prefix}text_mask"]}
    return out | {k: src[audio_prefix + k] for k in AUDIO_PROMPT if audio_prefix + k in src}


def drop_audio_prompt(batch: dict, drop_text: Tensor) -> dict:
    """`text_inputs` of a batch whose rows in `drop_text` take the empty prompt's audio
    conditioning (the CLIP tokens are dropped by the model itself)."""
    out = text_inputs(batch)
    for k in AUDIO_PROMPT:
        if k in out:
            out[k] = torch.where(_bcast(drop_text, out[k]) > 0, batch[f"null_{k}"], out[k])
    return out


class JointDiffusion:
    """Training loss and sampler for JointDiT on one unified time."""

    def __init__(self, cfg_diffusion):
        self.cfg = cfg_diffusion
        self.time = UnifiedTime(cfg_diffusion)
        if self.time.audio_prediction == "v" and cfg_diffusion.audio_loss != "eps":
            raise UserError(
                f"diffusion.audio_loss={cfg_diffusion.audio_loss} re-weights an epsilon output's "
                "loss into v-prediction's; with diffusion.audio_prediction=v it already is one: "
                "use diffusion.audio_loss=eps"
            )

    # ------------------------------------------------------------------------------------
    # training

    def loss(self, model, batch: dict, generator=None) -> tuple[Tensor, dict[str, float]]:
        """Diffusion loss on a collated LatentDataset batch; returns (loss, logs).

        Draws t, noise, condition dropout and (with p_indep_t) independent per-modality
        levels, a third of those with one modality fully clean (a pure condition, no loss),
        which teaches the joint model v2a and a2v. Calls the model only as model(...).
        """
        c = self.cfg
        x_v, x_a = batch["video"], batch["audio"]
        b, dev = x_v.shape[0], x_v.device
        t = _rand(b, generator, dev)
        indep = _rand(b, generator, dev) < c.p_indep_t
        which = torch.randint(0, 3, (b,), generator=generator, device=dev)  # 1: video clean
        t_v = torch.where(indep, _rand(b, generator, dev), t)
        t_a = torch.where(indep, _rand(b, generator, dev), t)
        clean_v = indep & (which == 1)
        clean_a = indep & (which == 2)
        t_v = torch.where(clean_v, torch.zeros_like(t_v), t_v)
        t_a = torch.where(clean_a, torch.zeros_like(t_a), t_a)

        per_v, per_a = self.per_sample_loss(
            model,
            batch,
            t_v,
            t_a,
            _randn_like(x_v, generator),
            _randn_like(x_a, generator),
            clean_v=clean_v,
            clean_a=clean_a,
            drop_image=_rand(b, generator, dev) < c.p_drop_image,
            drop_text=_rand(b, generator, dev) < c.p_drop_text,
            iso=_rand(b, generator, dev) < c.p_iso,
            event_weight=c.event_weight,
        )
        per_a = per_a * self.audio_loss_weight(t_a, clean_v)
        keep_v, keep_a = (~clean_v).float(), (~clean_a).float()
        loss_v = (per_v * keep_v).sum() / keep_v.sum().clamp(min=1)
        loss_a = (per_a * keep_a).sum() / keep_a.sum().clamp(min=1)
        loss = loss_v + loss_a
        if loss.device.type == "meta":  # the memory planner's dry run has no values
            return loss, {}
        return loss, {"loss_video": loss_v.item(), "loss_audio": loss_a.item()}

    def audio_loss_weight(self, t_a: Tensor, clean_v: Tensor | None = None) -> Tensor:
        """(B,) weights of the audio loss of an epsilon output. "eps" (AudioLDM2's, the
        paper's; the only choice with audio_prediction v, whose loss is v's already): 1, so the
        error on the clean audio counts only by SNR = alpha_bar / (1 - alpha_bar), near 0 over
        the noisier half of the levels, where the sound's timing is decided. "v": 1 / alpha_bar
        (at most `audio_loss_max`), which turns the loss into v-prediction's: the clean-audio
        error weighted by 1 + SNR, as the video's EDM loss weights its own. "v2a": "v" on the
        rows whose video is clean (`clean_v`, the v2a rows: there the video can tell where the
        sound goes, at every level), "eps" on the others."""
        if self.cfg.audio_loss == "eps":
            return torch.ones_like(t_a)
        v = (1 / self.time.audio_alpha_bar(t_a)).clamp(max=float(self.cfg.audio_loss_max))
        if self.cfg.audio_loss == "v":
            return v
        clean_v = torch.zeros_like(t_a, dtype=torch.bool) if clean_v is None else clean_v
        return torch.where(clean_v, v, torch.ones_like(t_a))

    def per_sample_loss(
        self,
        model,
        batch: dict,
        t_v: Tensor,
        t_a: Tensor,
        n_v: Tensor,
        n_a: Tensor,
        clean_v: Tensor,
        clean_a: Tensor,
        drop_image: Tensor,
        drop_text: Tensor,
        iso: Tensor,
        event_weight: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample video and audio losses (B,) at levels t_v / t_a with noises n_v / n_a.
        The batch's first_frame is already noise-augmented (in pixel space, by the cache).

        A modality marked clean enters un-noised (its loss is then meaningless; `loss` drops it).
        event_weight > 0 weights each latent by 1 + event_weight * (its distance from the
        clip's temporal mean, relative to the clip's average distance), normalised to mean 1:
        the instants where something happens count more than the static content.
        """
        x_v, x_a = batch["video"], batch["audio"]
        b, dev = x_v.shape[0], x_v.device
        noisy_v = torch.where(_bcast(clean_v, x_v) > 0, x_v, self.time.noise_video(x_v, t_v, n_v))
        noisy_a = torch.where(_bcast(clean_a, x_a) > 0, x_a, self.time.noise_audio(x_a, t_a, n_a))
        out_v, out_a = model(
            **self.time.network_inputs(noisy_v, noisy_a, t_v, t_a),
            first_frame=batch["first_frame"],
            cond_aug=torch.full((b,), self.cfg.cond_aug, device=dev),
            image_emb=batch["image_emb"],
            **drop_audio_prompt(batch, drop_text),
            drop_image=drop_image,
            drop_text=drop_text,
            iso=iso,
        )
        # Video: MSE on the v target, which equals SVD's EDM-weighted denoiser loss
        # lambda(sigma) |D - x0|^2 with lambda = (sigma^2 + 1) / sigma^2 (sigma_data = 1).
        s = _bcast(self.time.video_sigma(t_v), x_v)
        v_target = (n_v - s * x_v) / (s**2 + 1).sqrt()
        err_v = (out_v.float() - v_target).pow(2)
        err_a = (out_a.float() - self.time.audio_target(x_a, t_a, n_a)).pow(2)
        if event_weight:
            return (
                _weighted_mean(err_v, event_weights(x_v, 1, event_weight)),
                _weighted_mean(err_a, event_weights(x_a, 2, event_weight)),
            )
        return err_v.flatten(1).mean(1), err_a.flatten(1).mean(1)

    # ------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def sample(
        self,
        model,
        cond: dict,
        num_frames: int,
        audio_frames: int,
        steps: int,
        weights: GuidanceWeights,
        generator=None,
        mode: str = "joint",
        given_video: Tensor | None = None,
        given_audio: Tensor | None = None,
        iso: bool = False,
        progress: Callable[[int, int], None] | None = None,
        given: str = "noised",
    ) -> tuple[Tensor, Tensor]:
        """Sample video latents (B,T,4,h,w) and audio latents (B,8,t,16), scaled like the cache.

        Each model call takes one step of both experts on their own ladders (`UnifiedTime.
        ladders`: video Euler on SVD's Karras sigmas, audio DDIM on AudioLDM2's timesteps), so
        a fresh model samples what the experts' pipelines sample. `generator`: one for both, or
        a (video, audio) pair (`Generator` seeds both alike, as SVD's and AudioLDM2's pipelines
        would be seeded); the video's draws come first. mode "v2a" / "a2v" holds the given
        modality at every step: given="noised" at its noised ground truth on its ladder,
        given="clean" clean at level 0 (for models trained with p_indep_t > 0; "auto" picks
        that when p_indep_t > 0). iso=True runs with joint attention off (ablation). JointCFG:
        DESIGN section 5, every branch in one batched forward.
        """
        if mode not in MODES:
            raise UserError(f"sampling mode {mode!r} is not known; accepted: {', '.join(MODES)}")
        if given not in GIVEN_LEVELS:
            raise UserError(f"given={given!r} is not known; accepted: {', '.join(GIVEN_LEVELS)}")
        clean = self.given_is_clean(given)
        if not 1 <= steps <= self.time.num_audio_steps:
            raise UserError(f"steps={steps}: accepted: 1 to {self.time.num_audio_steps}")
        if mode == "v2a" and given_video is None:
            raise UserError("mode v2a needs the given video latents")
        if mode == "a2v" and given_audio is None:
            raise UserError("mode a2v needs the given audio latents")
        gen_v, gen_a = generator if isinstance(generator, tuple) else (generator, generator)
        first = cond["first_frame"]
        b, dev = first.shape[0], first.device
        v_shape = (b, num_frames, *first.shape[1:])
        a_shape = (b, self.cfg.audio_channels, audio_frames, self.cfg.audio_bins)
        self._branches(weights, cond, iso)  # a missing negative prompt fails before step 1

        t_video, t_audio, audio_landing = self.time.ladders(steps)
        # x ~ N(0, sigma_max^2 + 1): the marginal of unit-variance data at sigma_max, SVD's draw
        x_v = (
            first.new_empty(v_shape).normal_(generator=gen_v) * (self.time.sigma_max**2 + 1) ** 0.5
        )
        x_a = first.new_empty(a_shape).normal_(generator=gen_a)
        cond_aug = torch.full((b,), self.cfg.cond_aug, device=dev)
        zero = torch.zeros(b, device=dev)
        for k in range(steps):
            t_v = t_video[k].float().to(dev).expand(b)
            t_a = t_audio[k].float().to(dev).expand(b)
            if mode == "v2a":
                noise = _randn_like(x_v, gen_v)
                x_v = given_video if clean else self.time.noise_video(given_video, t_v, noise)
                t_v = zero if clean else t_v
            if mode == "a2v":
                noise = _randn_like(x_a, gen_a)
                x_a = given_audio if clean else self.time.noise_audio(given_audio, t_a, noise)
                t_a = zero if clean else t_a
            out_v, out_a = self.guided_outputs(
                model, cond, weights, x_v, x_a, (t_v, t_a), first, cond_aug, iso
            )
            sigma_next = self.time.video_sigma(t_video[k + 1]) if k + 1 < steps else 0.0
            x_v = self._video_step(x_v, t_v, float(sigma_next), out_v)
            x_a = self._audio_step(x_a, t_a, float(audio_landing[k]), out_a)
            if progress is not None:
                progress(k + 1, steps)
        if mode == "v2a":
            x_v = given_video
        if mode == "a2v":
            x_a = given_audio
        return x_v, x_a

    def given_is_clean(self, given: str) -> bool:
        """Resolve "auto": clean when the model was trained with clean partners (p_indep_t)."""
        return given == "clean" or (given == "auto" and self.cfg.p_indep_t > 0)

    def _video_step(self, x: Tensor, t: Tensor, sigma_next: float, v: Tensor) -> Tensor:
        """One Euler step of the EDM ODE from sigma(t) to sigma_next (0: the clean estimate)."""
        denoised = self.time.video_denoised(x, t, v)
        s = _bcast(self.time.video_sigma(t), x)
        return x + (sigma_next - s) * (x - denoised) / s

    def _audio_step(self, x: Tensor, t: Tensor, alpha_bar_next: float, out: Tensor) -> Tensor:
        """One deterministic DDIM step (eta 0) from level t to alpha_bar_next."""
        denoised = self.time.audio_denoised(x, t, out)
        noise = self.time.audio_noise(x, t, out)
        return alpha_bar_next**0.5 * denoised + (1 - alpha_bar_next) ** 0.5 * noise

    # ------------------------------------------------------------------------------------
    # JointCFG

    @staticmethod
    def _branches(weights: GuidanceWeights, cond: dict, iso: bool) -> list[dict]:
        """The forward branches the weights need; the conditional one always comes first. A
        dropped text is the model's null for the joint context and the empty prompt's
        conditioning for an audio expert that reads AudioLDM2's (`AUDIO_PROMPT`)."""
        full = {"iso": iso, "drop_image": False, "drop_text": False, "text": text_inputs(cond)}
        branches = [{**full, "name": "cond"}]
        if (weights.wv or weights.wa) and not iso:  # in iso mode the iso term is zero
            branches.append({**full, "name": "iso", "iso": True})
        if weights.image:
            branches.append({**full, "name": "no_image", "drop_image": True})
        if weights.wt:
            null = text_inputs(cond, audio_prefix="null_")
            branches.append({**full, "name": "no_text", "drop_text": True, "text": null})
        if weights.wnt:
            if "neg_text_emb" not in cond:
                raise UserError("guidance weight wnt needs a negative prompt (NEG_PROMPT)")
            branches.append({**full, "name": "neg_text", "text": text_inputs(cond, "neg_")})
        return branches

    def guided_outputs(
        self,
        model,
        cond: dict,
        w: GuidanceWeights,
        x_v: Tensor,
        x_a: Tensor,
        t: Tensor | tuple[Tensor, Tensor],
        first_frame: Tensor,
        cond_aug: Tensor,
        iso: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """JointCFG raw outputs (video v, audio epsilon or v) for noisy x_v, x_a at unified
        time t (B,) (or a (t_video, t_audio) pair when one modality is held at another level).

        All branches the weights need run as one batched forward and combine as in DESIGN
        section 5. Guidance acts on the raw outputs: within a step every branch shares x and
        t, and the denoised estimates are affine in the outputs, so this equals guiding D_m.
        first_frame is the noise-augmented conditioning latent. The image weight of the video
        follows SVD's per-frame ramp (`GuidanceWeights.image_ramp`).
        """
        branches = self._branches(w, cond, iso)
        n, b, dev = len(branches), x_v.shape[0], x_v.device
        t_v, t_a = t if isinstance(t, tuple) else (t, t)

        def rows(flag: str) -> Tensor:
            return torch.tensor([br[flag] for br in branches], device=dev).repeat_interleave(b)

        def tile(x: Tensor) -> Tensor:
            return x.repeat(n, *([1] * (x.dim() - 1)))

        out_v, out_a = model(
            **self.time.network_inputs(tile(x_v), tile(x_a), tile(t_v), tile(t_a)),
            first_frame=tile(first_frame),
            cond_aug=tile(cond_aug),
            image_emb=tile(cond["image_emb"]),
            **{k: torch.cat([br["text"][k] for br in branches]) for k in branches[0]["text"]},
            drop_image=rows("drop_image"),
            drop_text=rows("drop_text"),
            iso=rows("iso"),
        )
        parts_v = dict(zip([br["name"] for br in branches], out_v.chunk(n)))
        parts_a = dict(zip([br["name"] for br in branches], out_a.chunk(n)))
        image_v = w.image_ramp(x_v.shape[1]).to(dev, out_v.dtype).view(1, -1, 1, 1, 1)
        terms = {"iso": (w.wv, w.wa), "no_image": (image_v, w.wi), "no_text": (w.wt, w.wt)}
        terms["neg_text"] = (w.wnt, w.wnt)
        guided_v, guided_a = parts_v["cond"], parts_a["cond"]
        for name, (wv, wa) in terms.items():
            if name in parts_v:
                guided_v = guided_v + wv * (parts_v["cond"] - parts_v[name])
                guided_a = guided_a + wa * (parts_a["cond"] - parts_a[name])
        return guided_v, guided_a
