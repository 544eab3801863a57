"""Non-square clips: `data.size` is an int (square) or [height, width], read by frame_hw."""

import json

import pytest
import torch

from jointdit import memory
from jointdit.config import frame_hw, load_config
from jointdit.data.cache import _size_stamp
from jointdit.data.synthetic import generate
from jointdit.errors import UserError
from jointdit.media import read_clip, resize_crop
from jointdit.model import build_model
from jointdit.model.joint_block import video_positions
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo" / "base.yaml"


def test_size_is_an_int_or_height_width():
    assert frame_hw(64) == (64, 64) and frame_hw([320, 576]) == (320, 576)
    cfg = load_config(DEMO, ["data.size=[32,48]"], env={})
    assert frame_hw(cfg) == frame_hw(cfg.data.size) == (32, 48)
    assert frame_hw(load_config(DEMO, env={})) == (64, 64)
    for bad in ("[320]", "[0,64]", "[32,48,3]", "abc", "[32.5,48]"):
        with pytest.raises(UserError, match=r"data\.size.*\[height, width\]"):
            load_config(DEMO, [f"data.size={bad}"], env={})


def test_paper_clip_config_plans_14_frames_of_40x72_latents():
    cfg = load_config(REPO / "configs" / "stage_a.yaml", env={})
    assert frame_hw(cfg) == (320, 576) and memory.clip_frames(cfg) == 14
    shapes = memory.batch_shapes(cfg, memory.base_levers(cfg), 1)
    assert shapes["video"] == (1, 14, 4, 40, 72) and shapes["first_frame"] == (1, 4, 40, 72)
    assert shapes["audio"] == (1, 8, 50, 16)
    asva = load_config(REPO / "configs" / "asva_eval.yaml", env={})
    assert frame_hw(asva) == (256, 256) and memory.clip_frames(asva) == 12


def test_resize_crop_and_cache_stamp_take_height_width():
    frame = torch.rand(3, 90, 120)  # 4:3 source -> 16:9 target: crop top and bottom
    assert resize_crop(frame, (320, 576)).shape == (3, 320, 576)
    assert resize_crop(frame, 48).shape == (3, 48, 48)
    # square sizes keep the stamp caches had before [height, width] existed
    assert _size_stamp(256) == _size_stamp([256, 256]) == 256
    assert _size_stamp([320, 576]) == [320, 576]


def test_synthetic_clips_and_model_run_non_square(tmp_path):
    data = load_config(
        DEMO, ["data.size=[32,48]", "data.synth.num_train=1", "data.synth.num_test=1"], env={}
    ).data
    assert generate(tmp_path, data, seed=0, progress=False)["written"] == 2
    mp4 = sorted(tmp_path.rglob("*.mp4"))[0]
    clip = read_clip(mp4, data.fps, frame_hw(data.size), data.sample_rate)
    assert clip.frames.shape[-2:] == (32, 48)
    sidecar = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert sidecar["size"] == [32, 48]

    # the model takes its token grid from the latents: a 4x6 map gives 4x6 positions
    assert video_positions(2, 4, 6, 7.0).shape == (2 * 4 * 6, 4)
    torch.manual_seed(0)
    model = build_model(load_config(overrides=[])).eval()
    b, g = 1, torch.Generator().manual_seed(0)
    with torch.no_grad():
        video, audio = model(
            video=torch.randn(b, 3, 4, 4, 6, generator=g),
            audio=torch.randn(b, 8, 10, 16, generator=g),
            video_timestep=torch.zeros(b),
            audio_timestep=torch.zeros(b, dtype=torch.long),
            video_t=torch.full((b,), 0.5),
            audio_t=torch.full((b,), 0.5),
            first_frame=torch.randn(b, 4, 4, 6, generator=g),
            cond_aug=torch.zeros(b),
            image_emb=torch.randn(b, 32, generator=g),
            text_emb=torch.randn(b, 16, 32, generator=g),
            text_mask=torch.ones(b, 16, dtype=torch.long),
        )
    assert video.shape == (b, 3, 4, 4, 6) and audio.shape == (b, 8, 10, 16)
