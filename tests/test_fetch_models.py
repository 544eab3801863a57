"""make fetch-models without a network: the offline error, markers, resume, HF_TOKEN, CLIP split."""

import json

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError
from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

from jointdit.codecs.clip_tokenizer import build_clip_tokenizer
from jointdit.codecs.fetch import MARKER, fetch_models
from jointdit.config import load_config
from jointdit.errors import UserError
from tests.conftest import run_script


def config(tmp_path):
    return load_config(None, [f"codecs.pretrained_dir={tmp_path / 'pretrained'}"], env={})


class FakeHub:
    """Stands in for snapshot_download: writes the files the patterns ask for, or fails."""

    def __init__(self, fail_after_files=None):
        self.calls = []
        self.fail_after_files = fail_after_files

    def __call__(self, repo_id, *, revision, local_dir, allow_patterns, token):
        self.calls.append({"repo": repo_id, "token": token, "patterns": allow_patterns})
        subs = sorted({p.split("/")[0] for p in allow_patterns})
        for i, sub in enumerate(subs):
            if self.fail_after_files is not None and i >= self.fail_after_files:
                raise OSError("connection reset by peer")
            name = "preprocessor_config.json" if sub == "feature_extractor" else "config.json"
            (local_dir / sub).mkdir(parents=True, exist_ok=True)
            (local_dir / sub / name).write_text("{}")
        return str(local_dir)


def test_offline_is_one_line_and_nonzero(tmp_path):
    target = f"codecs.pretrained_dir={tmp_path / 'pretrained'}"
    proc = run_script(
        "fetch_models.py", "--only", "audioldm2", target, timeout=120, HF_HUB_OFFLINE="1"
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "offline" in lines[0] and "make fetch-models" in lines[0]
    assert not (tmp_path / "pretrained" / "audioldm2" / MARKER).exists()


def test_download_marks_complete_and_skips_next_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub = FakeHub()
    cfg = config(tmp_path)
    fetch_models(cfg.codecs, ["svd", "audioldm2"], download=hub, log=lambda _: None)
    assert [c["repo"] for c in hub.calls] == [
        cfg.codecs.sources.svd.repo,
        cfg.codecs.sources.audioldm2.repo,
    ]
    assert all(c["token"] == "hf_secret" for c in hub.calls)
    assert "vae/diffusion_pytorch_model.safetensors" in hub.calls[0]["patterns"]
    assert not any(p.endswith(".bin") for p in hub.calls[0]["patterns"])
    for name in ("svd", "audioldm2"):
        assert json.loads((tmp_path / "pretrained" / name / MARKER).read_text())["repo"]
    fetch_models(cfg.codecs, ["svd", "audioldm2"], download=hub, log=lambda _: None)
    assert len(hub.calls) == 2  # complete sources are skipped


def test_interrupted_download_is_not_complete_and_is_redone(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(UserError, match="re-run `make fetch-models` to resume"):
        fetch_models(cfg.codecs, ["svd"], download=FakeHub(fail_after_files=2), log=lambda _: None)
    assert not (tmp_path / "pretrained" / "svd" / MARKER).exists()
    hub = FakeHub()
    fetch_models(cfg.codecs, ["svd"], download=hub, log=lambda _: None)
    assert len(hub.calls) == 1 and (tmp_path / "pretrained" / "svd" / MARKER).exists()


def test_gated_repo_asks_for_a_token(tmp_path):
    def gated(repo_id, **_):
        response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co"))
        raise GatedRepoError("gated", response=response)

    with pytest.raises(UserError, match="HF_TOKEN") as err:
        fetch_models(config(tmp_path).codecs, ["svd"], download=gated, log=lambda _: None)
    assert "\n" not in str(err.value)


def test_clip_text_is_split_into_text_encoder_and_tokenizer(tmp_path):
    def hub(repo_id, *, revision, local_dir, allow_patterns, token):
        text = dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        )
        vision = dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
        CLIPModel(
            CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        ).save_pretrained(local_dir)
        build_clip_tokenizer().save_pretrained(local_dir)
        return str(local_dir)

    fetch_models(config(tmp_path).codecs, ["clip_text"], download=hub, log=lambda _: None)
    dest = tmp_path / "pretrained" / "clip_text"
    model = CLIPTextModelWithProjection.from_pretrained(dest / "text_encoder")
    assert model.config.projection_dim == 16
    assert CLIPTokenizer.from_pretrained(dest / "tokenizer")("a cat").input_ids[0] == 49406
    assert (dest / MARKER).exists() and not (dest / "_download").exists()
