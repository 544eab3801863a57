"""Unified time, training loss, the sampler and JointCFG."""

import pytest
import torch
from torch import nn

from jointdit.config import load_config
from jointdit.diffusion import GuidanceWeights, JointDiffusion, UnifiedTime
from jointdit.errors import UserError
from jointdit.model import build_model

B, T, TA = 2, 4, 12


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero joint blocks so every branch differs
        for p in m.joint_blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


class Recorder(nn.Module):
    """Wraps a model the way accelerate/DDP would (forward only) and counts batch rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.rows: list[int] = []

    def forward(self, **kwargs):
        self.rows.append(kwargs["video"].shape[0])
        return self.inner(**kwargs)


def _batch(b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "video": torch.randn(b, T, 4, 8, 8, generator=g),
        "audio": torch.randn(b, 8, TA, 16, generator=g),
        "first_frame": torch.randn(b, 4, 8, 8, generator=g),
        "image_emb": torch.randn(b, 32, generator=g),
        "text_emb": torch.randn(b, 16, 32, generator=g),
        "text_mask": torch.ones(b, 16, dtype=torch.long),
        "clip_id": [f"c{i}" for i in range(b)],
    }


def _cond(b=B, seed=1, negative=False):
    batch = _batch(b, seed)
    cond = {k: batch[k] for k in ("first_frame", "image_emb", "text_emb", "text_mask")}
    if negative:
        cond["neg_text_emb"] = -batch["text_emb"]
        cond["neg_text_mask"] = batch["text_mask"]
    return cond


def test_unified_time_maps_to_each_experts_range(cfg):
    ut = UnifiedTime(cfg.diffusion)
    t = torch.tensor([0.0, 0.5, 1.0])
    sigma = ut.video_sigma(t)
    torch.testing.assert_close(sigma[[0, 2]], torch.tensor([0.002, 700.0]))
    assert sigma[0] < sigma[1] < sigma[2]
    assert ut.audio_index(t).tolist() == [0, 499, 999]
    ab = ut.audio_alpha_bar(t)
    assert ab[0] > 0.99 and ab[2] < 0.01 and ab[0] > ab[1] > ab[2]
    inputs = ut.network_inputs(torch.ones(3, 1), torch.ones(3, 1), t, t)
    torch.testing.assert_close(inputs["video_timestep"], sigma.log() / 4)  # SVD's c_noise


def test_jointcfg_with_zero_weights_is_the_plain_conditional_prediction(cfg, model):
    diff = JointDiffusion(cfg.diffusion)
    rec = Recorder(model)
    cond = _cond(b=1)
    g = torch.Generator().manual_seed(3)
    x_v, x_a = torch.randn(1, T, 4, 8, 8, generator=g), torch.randn(1, 8, TA, 16, generator=g)
    t = torch.tensor([0.7])
    aug = torch.tensor([0.02])
    with torch.no_grad():
        got = diff.guided_outputs(
            rec, cond, GuidanceWeights(), x_v, x_a, t, cond["first_frame"], aug
        )
        ref = model(
            **diff.time.network_inputs(x_v, x_a, t, t),
            first_frame=cond["first_frame"],
            cond_aug=aug,
            image_emb=cond["image_emb"],
            text_emb=cond["text_emb"],
            text_mask=cond["text_mask"],
        )
    assert rec.rows == [1]
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


@pytest.mark.parametrize(
    "weights,branches",
    [
        (GuidanceWeights(), 1),
        (GuidanceWeights(wv=1.0), 2),
        (GuidanceWeights(wa=1.0), 2),
        (GuidanceWeights(wv=1.0, wa=2.0), 2),
        (GuidanceWeights(wi=0.5), 2),
        (GuidanceWeights(wt=0.5, wnt=0.5), 3),
        (GuidanceWeights(1.0, 1.0, 1.0, 1.0, 1.0), 5),
    ],
)
def test_a_zero_weight_drops_its_branch(cfg, model, weights, branches):
    rec = Recorder(model)
    JointDiffusion(cfg.diffusion).sample(
        rec, _cond(negative=True), T, TA, steps=2, weights=weights, generator=torch.Generator()
    )
    assert rec.rows == [B * branches] * 2


def test_jointcfg_follows_the_formula(cfg, model):
    diff = JointDiffusion(cfg.diffusion)
    w = GuidanceWeights(wv=1.5, wa=0.5, wi=0.7, wt=0.3, wnt=1.1)
    cond = _cond(negative=True)
    g = torch.Generator().manual_seed(4)
    x_v, x_a = torch.randn(B, T, 4, 8, 8, generator=g), torch.randn(B, 8, TA, 16, generator=g)
    t, aug = torch.full((B,), 0.4), torch.full((B,), 0.02)
    keep, drop = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)

    def branch(text=cond["text_emb"], drop_image=keep, drop_text=keep, iso=False):
        return model(
            **diff.time.network_inputs(x_v, x_a, t, t),
            first_frame=cond["first_frame"],
            cond_aug=aug,
            image_emb=cond["image_emb"],
            text_emb=text,
            text_mask=cond["text_mask"],
            drop_image=drop_image,
            drop_text=drop_text,
            iso=iso,
        )

    with torch.no_grad():
        got = diff.guided_outputs(model, cond, w, x_v, x_a, t, cond["first_frame"], aug)
        c, i = branch(), branch(iso=True)
        ni, nt, neg = (
            branch(drop_image=drop),
            branch(drop_text=drop),
            branch(text=-cond["text_emb"]),
        )
    for m, w_iso in ((0, w.wv), (1, w.wa)):
        expected = (
            c[m]
            + w_iso * (c[m] - i[m])
            + w.wi * (c[m] - ni[m])
            + w.wt * (c[m] - nt[m])
            + w.wnt * (c[m] - neg[m])
        )
        torch.testing.assert_close(got[m], expected, rtol=1e-4, atol=1e-5)


def test_sampler_is_reproducible_for_a_seed(cfg, model):
    diff = JointDiffusion(cfg.diffusion)
    w = GuidanceWeights(wv=1.0, wi=0.5)
    calls = []

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return diff.sample(model, _cond(), T, TA, 3, w, gen, progress=lambda k, n: calls.append(k))

    v1, a1 = run(7)
    v2, a2 = run(7)
    v3, _ = run(8)
    assert v1.shape == (B, T, 4, 8, 8) and a1.shape == (B, 8, TA, 16)
    assert torch.equal(v1, v2) and torch.equal(a1, a2)
    assert not torch.equal(v1, v3)
    assert calls == [1, 2, 3] * 3
    assert torch.isfinite(v1).all() and torch.isfinite(a1).all()


def test_v2a_and_a2v_return_the_given_modality(cfg, model):
    diff = JointDiffusion(cfg.diffusion)
    given = _batch(seed=9)
    gen = torch.Generator().manual_seed(0)
    v, a = diff.sample(
        model, _cond(), T, TA, 2, GuidanceWeights(), gen, mode="v2a", given_video=given["video"]
    )
    assert torch.equal(v, given["video"]) and a.shape == given["audio"].shape
    v, a = diff.sample(
        model, _cond(), T, TA, 2, GuidanceWeights(), gen, mode="a2v", given_audio=given["audio"]
    )
    assert torch.equal(a, given["audio"]) and v.shape == given["video"].shape


def test_sampler_errors_are_for_people(cfg, model):
    diff = JointDiffusion(cfg.diffusion)
    with pytest.raises(UserError, match="accepted: joint, v2a, a2v"):
        diff.sample(model, _cond(), T, TA, 2, GuidanceWeights(), mode="t2v")
    with pytest.raises(UserError, match="needs the given video"):
        diff.sample(model, _cond(), T, TA, 2, GuidanceWeights(), mode="v2a")
    with pytest.raises(UserError, match="negative prompt"):
        diff.sample(model, _cond(), T, TA, 2, GuidanceWeights(wnt=1.0))


def test_a_few_steps_lower_the_loss_through_a_wrapper(cfg):
    torch.manual_seed(0)
    net = build_model(cfg).train()
    wrapped = Recorder(net)  # only __call__ is available, as under DDP
    diff = JointDiffusion(cfg.diffusion)
    batch = _batch(b=4)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss_at_fixed_draws():
        return diff.loss(wrapped, batch, generator=torch.Generator().manual_seed(11))

    first, logs = loss_at_fixed_draws()
    assert set(logs) == {"loss_video", "loss_audio"}
    for _ in range(6):
        opt.zero_grad()
        loss, _ = diff.loss(wrapped, batch, generator=torch.Generator().manual_seed(11))
        loss.backward()
        opt.step()
    with torch.no_grad():
        last, _ = loss_at_fixed_draws()
    assert last < 0.9 * first


def test_loss_with_independent_levels_for_every_sample(cfg, model):
    c = load_config(overrides=["diffusion.p_indep_t=1.0"]).diffusion
    diff = JointDiffusion(c)
    model.train()
    loss, logs = diff.loss(model, _batch(b=6), generator=torch.Generator().manual_seed(0))
    loss.backward()
    model.eval()
    model.zero_grad()
    assert torch.isfinite(loss)
    assert all(v == v and v >= 0 for v in logs.values())  # no NaN from an all-clean side


class Oracle(nn.Module):
    """The exact denoiser for data that is one known pair (x0_video, x0_audio)."""

    def __init__(self, time, video0, audio0):
        super().__init__()
        self.time, self.video0, self.audio0 = time, video0, audio0

    def forward(self, video, audio, video_timestep, audio_timestep, **_):
        sigma = (4 * video_timestep).exp().reshape(-1, 1, 1, 1, 1)  # c_noise = ln(sigma)/4
        x = video * (sigma**2 + 1).sqrt()  # undo c_in
        noise = (x - self.video0) / sigma
        v = (noise - sigma * self.video0) / (sigma**2 + 1).sqrt()
        ab = self.time.alphas_cumprod[audio_timestep].reshape(-1, 1, 1, 1)
        eps = (audio - ab.sqrt() * self.audio0) / (1 - ab).sqrt()
        if self.time.audio_prediction == "v":
            return v, ab.sqrt() * eps - (1 - ab).sqrt() * self.audio0
        return v, eps


@pytest.mark.parametrize("audio_prediction", ["epsilon", "v"])
def test_sampler_with_the_exact_denoiser_walks_each_experts_ladder(audio_prediction):
    """Video: Euler to sigma 0 lands on the data. Audio: DDIM keeps the noise it starts with
    and lands on alpha_bar(0), as AudioLDM2's scheduler does: sqrt(ab0) x0 + sqrt(1-ab0) eps."""
    cfg = load_config(overrides=[f"diffusion.audio_prediction={audio_prediction}"])
    diff = JointDiffusion(cfg.diffusion)
    data = _batch(b=1, seed=3)
    x0_a = data["audio"].double()
    oracle = Oracle(diff.time, data["video"].double(), x0_a)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in _cond(b=1).items()}
    gens = (torch.Generator().manual_seed(0), torch.Generator().manual_seed(4))
    v, a = diff.sample(oracle, cond, T, TA, 8, GuidanceWeights(), gens)
    torch.testing.assert_close(v, data["video"].double(), rtol=1e-6, atol=1e-6)
    start = torch.empty_like(x0_a).normal_(generator=torch.Generator().manual_seed(4))
    ab = diff.time.alphas_cumprod.double()
    first = int(diff.time.ddim.timesteps[0])
    eps = (start - ab[first].sqrt() * x0_a) / (1 - ab[first]).sqrt()
    torch.testing.assert_close(a, ab[0].sqrt() * x0_a + (1 - ab[0]).sqrt() * eps)


def test_ladders_are_the_experts_schedulers():
    """The video's sigmas are SVD's Euler-Karras ones, the audio's levels AudioLDM2's DDIM
    timesteps, each DDIM step landing where diffusers' lands (the last on alpha_bar(0))."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from jointdit.model.sizes import AUDIOLDM2_REPO, SVD_REPO

    time = UnifiedTime(load_config().diffusion)
    euler = EulerDiscreteScheduler.from_pretrained(SVD_REPO / "scheduler")
    ddim = DDIMScheduler.from_pretrained(AUDIOLDM2_REPO / "scheduler")
    for steps in (1, 2, 25, 200):
        t_v, t_a, landing = time.ladders(steps)
        euler.set_timesteps(steps)
        torch.testing.assert_close(time.video_sigma(t_v).float(), euler.sigmas[:-1])
        ddim.set_timesteps(steps)
        assert torch.equal(time.audio_index(t_a.float()), ddim.timesteps)
        prev = ddim.timesteps - 1000 // steps
        want = [ddim.alphas_cumprod[p] if p >= 0 else ddim.final_alpha_cumprod for p in prev]
        torch.testing.assert_close(landing.float(), torch.stack(want))


class GaussianDenoiser(nn.Module):
    """The exact audio denoiser for Gaussian data x0 ~ N(0, diag(std^2)); the video's is 0."""

    def __init__(self, alphas_cumprod, std):
        super().__init__()
        self.ab, self.std = alphas_cumprod.double(), std.double()

    def eps(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ab = self.ab[index].reshape(-1, *[1] * (x.dim() - 1))
        x0 = ab.sqrt() * self.std**2 / (ab * self.std**2 + 1 - ab) * x  # E[x0 | x]
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    def forward(self, video, audio, audio_timestep, **_):
        return torch.zeros_like(video), self.eps(audio, audio_timestep)


@pytest.mark.parametrize("steps", [25, 50, 200])
def test_audio_sampler_keeps_the_data_variance_audioldm2s_ddim_keeps(steps):
    """Exact denoiser on Gaussian data (no network): the fraction of each component's variance
    the sampler keeps matches diffusers' DDIM with AudioLDM2's scheduler config within 2 %
    (the sampler that stopped at the clean estimate of level floor(999/N) kept 48-72 % where
    DDIM keeps 88-109 %)."""
    from diffusers import DDIMScheduler

    from jointdit.model.sizes import AUDIOLDM2_REPO

    diff = JointDiffusion(load_config().diffusion)
    frames = 256  # samples per channel; one data std per channel, from 0.02 to 3
    std = torch.logspace(-1.7, 0.48, 8, dtype=torch.float64).reshape(8, 1, 1)
    model = GaussianDenoiser(diff.time.alphas_cumprod, std)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in _cond(b=1).items()}
    gens = (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    _, ours = diff.sample(model, cond, 2, frames, steps, GuidanceWeights(), gens)

    ddim = DDIMScheduler.from_pretrained(AUDIOLDM2_REPO / "scheduler")
    ddim.set_timesteps(steps)
    ref = torch.empty_like(ours).normal_(generator=torch.Generator().manual_seed(1))
    for t in ddim.timesteps:
        ref = ddim.step(model.eps(ref, t.reshape(1)), t, ref).prev_sample

    kept = lambda x: x.pow(2).mean((0, 2, 3)) / std.flatten() ** 2  # noqa: E731
    total = lambda x: x.pow(2).mean() / (std**2).mean()  # noqa: E731
    assert total(ref) > 0.85  # DDIM keeps most of the data's variance
    torch.testing.assert_close(kept(ours), kept(ref), rtol=0.02, atol=0)


class Spy(nn.Module):
    """Records what the sampler feeds the model; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, video, audio, **kw):
        self.calls.append({"video": video, "audio": audio, **kw})
        return torch.zeros_like(video), torch.zeros_like(audio)


@pytest.mark.parametrize("given", ["clean", "noised", "auto"])
@pytest.mark.parametrize("p_indep_t", [0.0, 0.5])
def test_v2a_a2v_hold_the_given_modality_clean_or_noised(given, p_indep_t):
    c = load_config(overrides=[f"diffusion.p_indep_t={p_indep_t}"]).diffusion
    diff = JointDiffusion(c)
    clean = given == "clean" or (given == "auto" and p_indep_t > 0)
    data = _batch(seed=9)
    for mode, key, t_key in (("v2a", "video", "video_t"), ("a2v", "audio", "audio_t")):
        spy = Spy()
        diff.sample(
            spy, _cond(), T, TA, 3, GuidanceWeights(), torch.Generator().manual_seed(0),
            mode=mode, given=given, **{f"given_{key}": data[key]},
        )  # fmt: skip
        other_t = "audio_t" if t_key == "video_t" else "video_t"
        ladders = dict(zip(("video_t", "audio_t"), diff.time.ladders(3)[:2]))
        for k, call in enumerate(spy.calls):
            held = call[key]
            if key == "video":  # undo c_in at the level the sampler passed
                c_in = (diff.time.video_sigma(call[t_key]) ** 2 + 1).rsqrt()
                held = held / c_in.reshape(-1, 1, 1, 1, 1)
            assert torch.allclose(held, data[key], atol=1e-4) == clean
            own = torch.zeros(B) if clean else ladders[t_key][k].float().expand(B)
            torch.testing.assert_close(call[t_key], own)
            torch.testing.assert_close(call[other_t], ladders[other_t][k].float().expand(B))
    with pytest.raises(UserError, match="accepted: auto, noised, clean"):
        diff.sample(Spy(), _cond(), T, TA, 1, GuidanceWeights(), given="half", mode="joint")


def test_event_weights_favour_what_changes_and_leave_static_clips_alone():
    from jointdit.diffusion import event_weights

    static = torch.randn(2, 1, 4, 3, 3).expand(2, 5, 4, 3, 3)  # (B, T, C, h, w), no change
    torch.testing.assert_close(event_weights(static, 1, 10.0), torch.ones(2, 5, 4, 3, 3))
    spike = static.clone()
    spike[:, 2] += 3.0  # one frame lights up
    w = event_weights(spike, 1, 10.0)
    assert (w[:, 2] > w[:, 1]).all() and (w[:, 2] > w[:, 4]).all()


def test_event_weighted_loss_is_a_config_value(cfg):
    batch = _batch(b=2)
    batch["video"][:, 1] += 3.0  # an event: the loss weights differ from 1 there
    plain, _ = JointDiffusion(cfg.diffusion).loss(Spy(), batch, torch.Generator().manual_seed(3))
    c = load_config(overrides=["diffusion.event_weight=4.0"]).diffusion
    weighted, _ = JointDiffusion(c).loss(Spy(), batch, torch.Generator().manual_seed(3))
    assert torch.isfinite(weighted) and not torch.isclose(weighted, plain)


def test_audio_v_loss_is_the_v_prediction_loss_of_the_epsilon_output():
    c = load_config(overrides=["diffusion.audio_loss=v", "diffusion.audio_loss_max=50"]).diffusion
    diff = JointDiffusion(c)
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0.1, 0.3, 0.5])  # 1 / alpha_bar: about 1.1, 2.4, 11 (under the cap)
    x0, eps, eps_hat = (torch.randn(3, 8, 10, 16, generator=g) for _ in range(3))
    x = diff.time.noise_audio(x0, t, eps)
    ab = diff.time.audio_alpha_bar(t).reshape(-1, 1, 1, 1)
    x0_hat = (x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    v, v_hat = (ab.sqrt() * e - (1 - ab).sqrt() * x for e, x in ((eps, x0), (eps_hat, x0_hat)))
    eps_mse = (eps_hat - eps).pow(2).flatten(1).mean(1)
    v_mse = (v_hat - v).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(diff.audio_loss_weight(t) * eps_mse, v_mse)
    # capped at the noisy end; the paper's "eps" leaves the loss as it is
    assert diff.audio_loss_weight(torch.tensor([1.0])).item() == 50.0
    plain = JointDiffusion(load_config().diffusion)
    torch.testing.assert_close(plain.audio_loss_weight(t), torch.ones(3))


@pytest.mark.parametrize("audio_prediction", ["epsilon", "v"])
def test_the_audio_target_is_what_the_clean_estimate_and_the_step_invert(audio_prediction):
    c = load_config(overrides=[f"diffusion.audio_prediction={audio_prediction}"]).diffusion
    time = JointDiffusion(c).time
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([0.05, 0.5, 0.95])
    x0, eps = (torch.randn(3, 8, 10, 16, generator=g) for _ in range(2))
    x = time.noise_audio(x0, t, eps)
    target = time.audio_target(x0, t, eps)
    torch.testing.assert_close(time.audio_denoised(x, t, target), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(time.audio_noise(x, t, target), eps, rtol=1e-4, atol=1e-4)
    ab = time.audio_alpha_bar(t).reshape(-1, 1, 1, 1)
    expected = ab.sqrt() * eps - (1 - ab).sqrt() * x0 if audio_prediction == "v" else eps
    torch.testing.assert_close(target, expected)
    with pytest.raises(UserError, match="diffusion.audio_prediction"):
        load_config(overrides=["diffusion.audio_prediction=x0"])
    both = ["diffusion.audio_prediction=v", "diffusion.audio_loss=v2a"]
    with pytest.raises(UserError, match="diffusion.audio_loss=v2a re-weights"):
        JointDiffusion(load_config(overrides=both).diffusion)


def test_audio_loss_weighting_is_a_config_value(cfg):
    batch = _batch(b=4)
    plain, logs = JointDiffusion(cfg.diffusion).loss(Spy(), batch, torch.Generator().manual_seed(3))
    c = load_config(overrides=["diffusion.audio_loss=v"]).diffusion
    weighted, logs_v = JointDiffusion(c).loss(Spy(), batch, torch.Generator().manual_seed(3))
    assert logs_v["loss_video"] == logs["loss_video"]
    assert logs_v["loss_audio"] > logs["loss_audio"]  # every weight is >= 1, most are > 1
    with pytest.raises(UserError, match="diffusion.audio_loss"):
        load_config(overrides=["diffusion.audio_loss=x0"])


def test_audio_v2a_loss_weights_only_the_rows_whose_video_is_clean():
    c = load_config(overrides=["diffusion.audio_loss=v2a"]).diffusion
    diff = JointDiffusion(c)
    t = torch.tensor([0.3, 0.7, 0.7, 0.9])
    clean_v = torch.tensor([True, False, True, True])
    v = JointDiffusion(load_config(overrides=["diffusion.audio_loss=v"]).diffusion)
    expected = torch.where(clean_v, v.audio_loss_weight(t), torch.ones(4))
    torch.testing.assert_close(diff.audio_loss_weight(t, clean_v), expected)
    assert (expected[clean_v] > 1).all()
    # without clean-video rows the loss is the paper's
    torch.testing.assert_close(diff.audio_loss_weight(t), torch.ones(4))
