"""A fresh JointDiT is SVD plus AudioLDM2: at initialisation (Joint Blocks at identity), the
project's sampling path reproduces diffusers' `StableVideoDiffusionPipeline` and
`AudioLDM2Pipeline` (the same seed, the experts' default guidance), latents and decoded
outputs, joint and iso alike.

Tiny random-weight experts built from the published configs with narrowed widths
(jointdit/random_experts.py), saved in the `make fetch-models` layout and loaded by the
real loaders, on both sides. `make gpu-check` runs the same comparison at the published size.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from jointdit.config import load_config
from jointdit.diffusion import GuidanceWeights
from jointdit.model import build_model
from jointdit.pipeline import Generator, Request, weights_from_config
from jointdit.random_experts import (
    audioldm2_pipeline,
    config_overrides,
    svd_pipeline,
    write_experts,
)
from tests.conftest import REPO

H, W, FPS, SECONDS = 64, 96, 7, 1.0  # 7 frames of 8x12 latents; 25 audio latent frames (odd)
FRAMES = round(FPS * SECONDS)
STEPS, SEED = 4, 3
PROMPT = "a dog barks"
# The shipped `make infer` weights are the experts' own defaults: SVD's image guidance 1 -> 3
# across the frames, AudioLDM2's text guidance 3.5. The joint-vs-iso terms vanish at init.
EXPERTS = weights_from_config(load_config(REPO / "configs" / "infer.yaml", env={}).infer)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = write_experts(tmp_path_factory.mktemp("experts"))
    cfg = load_config(
        REPO / "configs" / "stage_a.yaml",
        [
            *config_overrides(root),
            "model.joint_dim=32",
            "model.joint_heads=2",
            f"model.video_fps={FPS}",
            f"data.size=[{H},{W}]",
            f"data.fps={FPS}",
            f"data.duration={SECONDS}",
            "memory.precision=no",
        ],
        env={},
    )
    torch.manual_seed(0)
    gen = Generator.for_model(build_model(cfg).eval(), cfg)
    picture = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = root / "picture.png"
    Image.fromarray(picture).save(image)
    return root, gen, image


@pytest.fixture(scope="module")
def svd(world):
    root, _, image = world
    pipe = svd_pipeline(root)
    kw = dict(height=H, width=W, num_frames=FRAMES, num_inference_steps=STEPS, fps=FPS)
    with torch.no_grad():
        latents = pipe(
            Image.open(image),
            **kw,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).frames
        frames = pipe.decode_latents(latents, FRAMES, decode_chunk_size=FRAMES)
    return latents[0], frames[0].transpose(0, 1).clamp(-1, 1)  # (T, 4, h, w), (T, 3, H, W)


@pytest.fixture(scope="module")
def audioldm2(world):
    root = world[0]
    pipe = audioldm2_pipeline(root)
    kw = dict(audio_length_in_s=SECONDS, num_inference_steps=STEPS, guidance_scale=3.5)
    with torch.no_grad():
        latents = pipe(
            PROMPT, **kw, generator=torch.Generator().manual_seed(SEED), output_type="latent"
        ).audios
        mel = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        wave = pipe.mel_spectrogram_to_waveform(mel)[:, : round(SECONDS * 16000)]
    return latents[0], wave[0]


def _ours(world, tmp_path, **kw):
    _, gen, image = world
    req = Request(tmp_path, image=str(image), prompt=PROMPT, steps=STEPS, seed=SEED, **kw)
    with torch.no_grad():
        video, audio, info, _ = gen.sample(req)
        frames, wave = gen.decode(video, audio, info)
    return video, audio, frames, wave


@pytest.mark.parametrize("iso", [False, True])
def test_fresh_model_samples_what_the_experts_pipelines_sample(
    world, svd, audioldm2, tmp_path, iso
):
    video, audio, frames, wave = _ours(world, tmp_path, weights=EXPERTS, iso=iso)
    assert rel(video, svd[0]) < 1e-4
    assert rel(frames, svd[1]) < 1e-4
    assert rel(audio, audioldm2[0]) < 1e-4
    assert rel(wave, audioldm2[1]) < 1e-4


def test_parity_fails_with_what_the_experts_do_not_do(world, svd, audioldm2, tmp_path):
    """The comparison has teeth: one image weight on every frame instead of SVD's ramp, no
    text guidance, or decoding in chunks, each moves the outputs far past the tolerance."""
    flat = GuidanceWeights(wv=1.5, wa=1.5, wi=2.0, wi_first=2.0, wt=0.0)
    video, audio, _, _ = _ours(world, tmp_path, weights=flat)
    assert rel(video, svd[0]) > 1e-2
    assert rel(audio, audioldm2[0]) > 1e-2
    _, gen, _ = world
    chunked = gen.codecs.video.decode(svd[0], chunk=4)  # a seam between frames 3 and 4
    assert rel(chunked, svd[1]) > 1e-3
