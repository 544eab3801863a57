"""The published architectures (SVD-XT, AudioLDM2), built from the configs shipped in
jointdit/assets/real_configs/ with random weights: no download, meta device where the size
would cost memory, the published topology with narrowed widths where values are compared."""

import json
import sys

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.pipelines.audioldm2.modeling_audioldm2 import AudioLDM2UNet2DConditionModel

from jointdit import memory
from jointdit.config import load_config
from jointdit.model import JointDiT, build_model
from jointdit.model.experts import AudioExpert, VideoExpert
from jointdit.model.sizes import AUDIOLDM2_REPO, SVD_REPO, get_size
from jointdit.random_experts import build_experts
from tests.conftest import REPO

STAGE_B = REPO / "configs" / "stage_b.yaml"
# Point the pretrained paths nowhere, so the shipped configs are used even where
# checkpoints/pretrained/ exists.
SHIPPED = ["model.random_init=true", "model.video_unet=none/unet", "model.audio_unet=none/unet"]


def _published(repo):
    return json.loads((repo / "unet" / "config.json").read_text())


@pytest.fixture(scope="module")
def stage_b_cfg():
    return load_config(STAGE_B, SHIPPED, env={})


@pytest.fixture(scope="module")
def meta_model(stage_b_cfg):
    with init_empty_weights():
        return build_model(stage_b_cfg)


def test_shipped_configs_build_the_published_sizes(meta_model):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(meta_model.video_expert.unet) / 1e6, 1) == 1524.6
    assert round(count(meta_model.audio_expert.unet) / 1e6, 1) == 346.9
    size = get_size("svd+audioldm2")
    assert meta_model.video_expert.num_segments == len(size.video_segments) == 4
    assert len(meta_model.joint_blocks) == 4
    widths = [
        (JointDiT._segment_width(meta_model.video_expert, i), JointDiT._segment_width(e, i))
        for i, e in enumerate([meta_model.audio_expert] * 4)
    ]
    assert widths == [(1280, 384), (1280, 640), (1280, 640), (640, 256)]


def test_every_stage_b_unfreeze_prefix_names_parameters(stage_b_cfg, meta_model):
    names = [n for n, _ in meta_model.named_parameters()]
    for prefix in stage_b_cfg.train.unfreeze:
        assert any(n.startswith(prefix + ".") for n in names), prefix
    meta_model.freeze_experts(list(stage_b_cfg.train.unfreeze))
    prefixes = tuple(stage_b_cfg.train.unfreeze)
    experts = [(n, p) for n, p in meta_model.named_parameters() if "_expert." in n]
    assert all(p.requires_grad == n.startswith(prefixes) for n, p in experts)
    trained = sum(p.numel() for n, p in experts if p.requires_grad)
    assert round(trained / 1e6) == 1806  # measured: the middle parts are most of both UNets


def _narrow(config: dict, widths: list[int], **changes) -> dict:
    """The published topology (blocks, layers, attention layout) at narrow widths."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    return {**out, "block_out_channels": widths, **changes}


@pytest.mark.parametrize("spatial", [(4, 8), (5, 9)])  # non-square; odd maps force upsample sizes
def test_sliced_published_video_topology_equals_forward(spatial):
    cfg = _narrow(
        _published(SVD_REPO),
        [32, 32, 64, 64],
        num_attention_heads=[1, 1, 2, 2],
        cross_attention_dim=32,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    )
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel.from_config(cfg).eval()
    expert = VideoExpert(unet, list(get_size("svd+audioldm2").video_segments))
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 3, 8, *spatial, generator=g)
    args = (sample, torch.tensor([0.4]), torch.randn(1, 1, 32, generator=g))
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        ref = unet(*args, ids).sample
        state = expert.begin(*args, ids)
        for i in range(expert.num_segments):
            state = expert.run_segment(i, state)
        assert torch.equal(expert.end(state), ref)


def test_sliced_published_audio_topology_equals_forward():
    cfg = _narrow(
        _published(AUDIOLDM2_REPO),
        [32, 32, 64, 64],
        cross_attention_dim=[[None, 32, 48]] * 4,
    )
    torch.manual_seed(0)
    unet = AudioLDM2UNet2DConditionModel.from_config(cfg).eval()
    expert = AudioExpert(unet, list(get_size("svd+audioldm2").audio_segments))
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(1, 8, 14, 16, generator=g)  # 14 frames: not a multiple of 8
    ctx, ctx_1 = torch.randn(1, 3, 32, generator=g), torch.randn(1, 3, 48, generator=g)
    with torch.no_grad():
        ref = unet(sample, torch.tensor([500]), ctx, encoder_hidden_states_1=ctx_1).sample
        state = expert.begin(sample, torch.tensor([500]), ctx, None, ctx_1, None)
        for i in range(expert.num_segments):
            state = expert.run_segment(i, state)
        assert torch.equal(expert.end(state), ref)


def test_planner_fits_stage_b_at_the_papers_clip_in_48_gib(stage_b_cfg):
    """Done means (issue 11): all 14 frames, no KV pooling, at most 45 GiB, exact levers."""
    assert memory.clip_frames(stage_b_cfg) == 14
    assert memory.batch_shapes(stage_b_cfg, memory.base_levers(stage_b_cfg), 1)["video"] == (
        1,
        14,
        4,
        40,
        72,
    )
    rung = next(r for r in memory.ladder(stage_b_cfg) if r["grad_ckpt"])
    parts = memory.breakdown(stage_b_cfg, rung, 1)
    assert parts["ema"] == 0 and parts["optimizer"] > 0  # EMA on CPU, AdamW still on the GPU
    peak = sum(parts.values())
    assert peak <= 45 * memory.GIB
    assert memory.lever_kind(rung, 14) == "exact" and rung["max_t"] == 0
    assert rung["kv_downsample"] == 1


def test_random_experts_at_the_published_size():
    """`make gpu-check`'s parity experts (narrow=False), on meta: the published parts, and the
    hand-made tokenizers within their text models' vocabularies and positions."""
    experts = build_experts(narrow=False, device="meta", dtype=torch.bfloat16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    svd, aldm, clip = experts["svd"], experts["audioldm2"], experts["clip_text"]
    assert round(count(svd["unet"]) / 1e6, 1) == 1524.6
    assert round(count(aldm["unet"]) / 1e6, 1) == 346.9
    assert round(count(svd["image_encoder"]) / 1e6) == 632  # CLIP ViT-H/14
    assert round(count(aldm["text_encoder_2"]) / 1e6) == 341  # FLAN-T5-large's encoder
    assert svd["unet"].dtype == torch.bfloat16
    clap_text = aldm["text_encoder"].config.text_config
    assert len(aldm["tokenizer"]) <= clap_text.vocab_size
    assert aldm["tokenizer"].model_max_length == clap_text.max_position_embeddings - 2 == 512
    assert len(aldm["tokenizer_2"]) <= aldm["text_encoder_2"].config.vocab_size
    assert aldm["tokenizer_2"].model_max_length == 128
    assert len(clip["tokenizer"]) == clip["text_encoder"].config.vocab_size == 49408
    assert clip["tokenizer"].model_max_length == 77


def test_gpu_check_runs_on_cpu_at_the_tiny_size(tmp_path, monkeypatch, capsys):
    """`make gpu-check` is for a GPU machine; its --cpu-smoke mode runs the same code tiny."""
    out = tmp_path / "gpu_check.json"
    argv = ["gpu_check.py", "--cpu-smoke", "--steps", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "scripts"))
    monkeypatch.chdir(tmp_path)  # nothing may be written into the repo
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main() == 0
    finally:
        torch.set_num_threads(threads)  # the smoke run uses one thread
    result = json.loads(out.read_text())
    assert [r["stage"] for r in result["train"]] == ["A", "B"]
    for row in result["train"]:
        assert row["clip"] == "clip 32x16 (WxH), 14 frames at 7 fps"
        assert row["predicted_peak_gib"] > 0 and row["model_tflop_per_step"] > 0
        assert row["samples_per_s"] > 0 and row["measured_peak_gib"] is None  # no GPU
    assert result["sample"]["decode_chunk"] == 2 and result["calibration_fit"] is None
    # Expert parity, narrowed and float32 here: the parity tests' bar (bf16 on a GPU misses it)
    parity = result["parity"]
    assert (parity["size"], parity["dtype"], parity["steps"]) == ("narrowed", "float32", 4)
    for key in ("video_latents_rel_l2", "audio_latents_rel_l2"):
        assert set(parity[key]) == {"joint", "iso"}
        assert all(0 < v < 1e-4 for v in parity[key].values()), (key, parity[key])
    assert parity["pipelines_in_dtype_vs_float32_rel_l2"] == {"video": 0.0, "audio": 0.0}
    assert parity["total_s"] > 0 and parity["peak_gib"] is None
    table = capsys.readouterr().out
    assert "gpu-check on cpu" in table and "calibration: no GPU figures" in table
    assert "parity vs diffusers' SVD / AudioLDM2 pipelines (narrowed experts, float32" in table
