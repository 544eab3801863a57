"""Tiny random-weight copies of the pretrained experts, laid out as `make fetch-models` writes them.

`build_tiny_experts(root)` writes `root/svd/`, `root/audioldm2/` and `root/clip_text/` with
`save_pretrained`, so every loader under test is the real one. Each config is the published one
(`jointdit/assets/real_configs/`) with narrowed widths: same classes, block layout, attention
layout and cross-attention pattern, a few channels each. Scheduler configs and the feature
extractors' configs are copied verbatim. The tokenizers are built offline from small hand-made
vocabularies that cover English letters and digits, so prompts like "a dog barks" and "" work.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AudioLDM2Pipeline,
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from jointdit.codecs.clip_tokenizer import build_clip_tokenizer
from jointdit.codecs.tiny import CLIP_TEXT

REAL = Path(__file__).resolve().parents[1] / "jointdit" / "assets" / "real_configs"
SVD_REAL = REAL / "stabilityai__stable-video-diffusion-img2vid-xt"
AUDIOLDM2_REAL = REAL / "cvssp__audioldm2"
# Bookkeeping keys of saved configs; the classes write their own.
_DROP = ("_class_name", "_diffusers_version", "_name_or_path", "architectures")
_DROP += ("torch_dtype", "transformers_version")
# Copied as published: they hold no widths.
VERBATIM = (
    ("feature_extractor", "preprocessor_config.json"),
    ("scheduler", "scheduler_config.json"),
)

# Widths shared across parts (the cross-attention contracts).
SVD_CROSS = 32  # SVD UNet cross_attention_dim == image encoder projection_dim
CLAP_PROJ = 16  # CLAP projection_dim == projection model text_encoder_dim
T5_WIDTH = 24  # T5 d_model == projection text_encoder_1_dim == UNet cross width #2
GPT_WIDTH = 32  # GPT-2 n_embd == projection langauge_model_dim == UNet cross width #1
ROBERTA_MAX = 16  # Roberta model_max_length (published 512); CLAP positions = this + 2
T5_MAX = 16  # T5 model_max_length (diffusers' conversion script sets 128)

# Narrowings of the published configs: only what differs from them.
SVD_UNET = dict(
    block_out_channels=[32, 32, 64, 64],  # published 320, 640, 1280, 1280
    num_attention_heads=[2, 2, 4, 4],  # published 5, 10, 20, 20 (head width 64 -> 16)
    cross_attention_dim=SVD_CROSS,
    addition_time_embed_dim=8,  # published 256; 3 added-time ids of this width ...
    projection_class_embeddings_input_dim=24,  # ... = 3 * addition_time_embed_dim (768 = 3 * 256)
)
SVD_VAE = dict(block_out_channels=[32, 32, 64, 64])  # published 128, 256, 512, 512
SVD_IMAGE_ENCODER = dict(  # ViT-H/14 narrowed; image_size 224 / patch 14 kept for the processor
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=2,
    projection_dim=SVD_CROSS,
)
AUDIOLDM2_UNET = dict(
    block_out_channels=[32, 32, 64, 64],  # published 128, 256, 384, 640
    attention_head_dim=2,  # diffusers reads it as the head count (published 8)
    cross_attention_dim=[[None, GPT_WIDTH, T5_WIDTH]] * 4,  # published [[None, 768, 1024]] * 4
)
AUDIOLDM2_VAE = dict(block_out_channels=[32, 32, 32])  # 3 levels: (1, 200, 64) -> (8, 50, 16)
VOCODER = dict(upsample_initial_channel=64)  # published 1024; rates 5*4*2*2*2 = 160 kept
CLAP_TEXT = dict(  # RoBERTa-base narrowed (the published config keeps ClapTextConfig's defaults)
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=ROBERTA_MAX + 2,  # RoBERTa positions start after padding_idx 1
    projection_hidden_size=32,
    fusion_hidden_size=32,
)
CLAP_AUDIO = dict(  # HTSAT narrowed; never run here (only waveform scoring uses it)
    depths=[1, 1, 1, 1],  # published 2, 2, 12, 2
    patch_embeds_hidden_size=8,  # published 128
    hidden_size=64,  # = patch_embeds_hidden_size * 2 ** 3, as published (128 -> 1024)
    num_attention_heads=[1, 2, 4, 8],
    projection_hidden_size=32,
)
T5_ENCODER = dict(  # FLAN-T5-large narrowed
    d_model=T5_WIDTH, d_kv=8, d_ff=48, num_heads=3, num_layers=2, num_decoder_layers=2
)
GPT2 = dict(n_embd=GPT_WIDTH, n_head=2, n_layer=2)  # GPT-2 base narrowed; max_new_tokens 8 kept
PROJECTION = dict(
    text_encoder_dim=CLAP_PROJ, text_encoder_1_dim=T5_WIDTH, langauge_model_dim=GPT_WIDTH
)

# Word pieces for the hand-made vocabularies (every letter is there too, so nothing is unknown).
_WORDS = ["a", "the", "dog", "barks", "cat", "meows", "loud", "music", "ball", "bounces", "and"]


def published(repo_dir: Path, sub: str, name: str = "config.json") -> dict:
    """A published config without its bookkeeping keys."""
    cfg = json.loads((repo_dir / sub / name).read_text())
    return {k: v for k, v in cfg.items() if k not in _DROP}


def narrowed(repo_dir: Path, sub: str, changes: dict) -> dict:
    """The published config of `sub` with `changes` applied."""
    return {**published(repo_dir, sub), **changes}


def _copy_verbatim(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(src.read_bytes())


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies hold)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_roberta_tokenizer() -> RobertaTokenizer:
    """Byte-level BPE with RoBERTa's specials, every byte, and merges for a few words."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for sym in _bytes_to_unicode():
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        piece = "Ġ"  # the byte-level space: words after a space merge into one token
        for ch in word:
            merges.append((piece, ch))
            piece += ch
    merges = list(dict.fromkeys(merges))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=ROBERTA_MAX)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """Unigram with T5's specials (<pad> 0, </s> 1, <unk> 2), letters, digits and a few words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in _WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + ".,'-!?"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX)


def _seeded(seed: int, k: int, build):
    """Each model draws from its own seed, so changing one leaves the others as they were."""
    torch.manual_seed(seed * 1000 + k)
    return build().eval()


def build_tiny_experts(root: Path, seed: int = 0) -> Path:
    """Write tiny SVD, AudioLDM2 and CLIP-text folders under `root`; same seed, same weights."""
    root = Path(root)
    svd, aldm, clip = root / "svd", root / "audioldm2", root / "clip_text"

    # --- SVD: image-to-video expert --------------------------------------------------------
    cfg = narrowed(SVD_REAL, "unet", SVD_UNET)
    _seeded(seed, 10, lambda: UNetSpatioTemporalConditionModel(**cfg)).save_pretrained(svd / "unet")
    cfg = narrowed(SVD_REAL, "vae", SVD_VAE)
    _seeded(seed, 11, lambda: AutoencoderKLTemporalDecoder(**cfg)).save_pretrained(svd / "vae")
    cfg = CLIPVisionConfig(**narrowed(SVD_REAL, "image_encoder", SVD_IMAGE_ENCODER))
    _seeded(seed, 12, lambda: CLIPVisionModelWithProjection(cfg)).save_pretrained(
        svd / "image_encoder"
    )
    for sub, name in VERBATIM:
        _copy_verbatim(SVD_REAL / sub / name, svd / sub / name)

    # --- AudioLDM2: text-to-audio expert ---------------------------------------------------
    roberta, t5_tok = tiny_roberta_tokenizer(), tiny_t5_tokenizer()
    cfg = narrowed(AUDIOLDM2_REAL, "unet", AUDIOLDM2_UNET)
    _seeded(seed, 20, lambda: AudioLDM2UNet2DConditionModel(**cfg)).save_pretrained(aldm / "unet")
    cfg = narrowed(AUDIOLDM2_REAL, "vae", AUDIOLDM2_VAE)
    _seeded(seed, 21, lambda: AutoencoderKL(**cfg)).save_pretrained(aldm / "vae")
    cfg = SpeechT5HifiGanConfig(**narrowed(AUDIOLDM2_REAL, "vocoder", VOCODER))
    _seeded(seed, 22, lambda: SpeechT5HifiGan(cfg)).save_pretrained(aldm / "vocoder")
    clap = published(AUDIOLDM2_REAL, "text_encoder")
    for leftover in ("hidden_size", "num_hidden_layers"):  # recomputed by ClapConfig
        clap.pop(leftover)
    clap["projection_dim"] = CLAP_PROJ
    clap["text_config"] = {**clap["text_config"], **CLAP_TEXT, "vocab_size": len(roberta)}
    clap["audio_config"] = {**clap["audio_config"], **CLAP_AUDIO}
    cfg = ClapConfig(**clap)
    _seeded(seed, 23, lambda: ClapModel(cfg)).save_pretrained(aldm / "text_encoder")
    t5 = narrowed(AUDIOLDM2_REAL, "text_encoder_2", T5_ENCODER)
    cfg = T5Config(**{**t5, "vocab_size": len(t5_tok)})
    _seeded(seed, 24, lambda: T5EncoderModel(cfg)).save_pretrained(aldm / "text_encoder_2")
    cfg = narrowed(AUDIOLDM2_REAL, "projection_model", PROJECTION)
    _seeded(seed, 25, lambda: AudioLDM2ProjectionModel(**cfg)).save_pretrained(
        aldm / "projection_model"
    )
    cfg = GPT2Config(**narrowed(AUDIOLDM2_REAL, "language_model", GPT2))
    _seeded(seed, 26, lambda: GPT2Model(cfg)).save_pretrained(aldm / "language_model")
    roberta.save_pretrained(aldm / "tokenizer")
    t5_tok.save_pretrained(aldm / "tokenizer_2")
    for sub, name in VERBATIM:
        _copy_verbatim(AUDIOLDM2_REAL / sub / name, aldm / sub / name)

    # --- CLIP text tower: build_tiny_codecs(seed).text_encoder (its seed slot 4) -------------
    cfg = CLIPTextConfig(**CLIP_TEXT)
    _seeded(seed, 4, lambda: CLIPTextModelWithProjection(cfg)).save_pretrained(
        clip / "text_encoder"
    )
    build_clip_tokenizer(CLIP_TEXT["max_position_embeddings"]).save_pretrained(clip / "tokenizer")
    return root


def svd_pipeline(root: Path) -> StableVideoDiffusionPipeline:
    """diffusers' SVD pipeline (float32, CPU) from the tiny `root/svd/` parts."""
    svd = Path(root) / "svd"
    return StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder.from_pretrained(svd / "vae"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(
            svd / "image_encoder", dtype=torch.float32
        ),
        unet=UNetSpatioTemporalConditionModel.from_pretrained(svd / "unet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(svd / "scheduler"),
        feature_extractor=CLIPImageProcessor.from_pretrained(svd / "feature_extractor"),
    )


def audioldm2_pipeline(root: Path) -> AudioLDM2Pipeline:
    """diffusers' AudioLDM2 pipeline (float32, CPU) from the tiny `root/audioldm2/` parts."""
    aldm = Path(root) / "audioldm2"
    f32 = dict(dtype=torch.float32)  # transformers 5 would otherwise follow config.dtype
    return AudioLDM2Pipeline(
        vae=AutoencoderKL.from_pretrained(aldm / "vae"),
        text_encoder=ClapModel.from_pretrained(aldm / "text_encoder", **f32),
        text_encoder_2=T5EncoderModel.from_pretrained(aldm / "text_encoder_2", **f32),
        projection_model=AudioLDM2ProjectionModel.from_pretrained(aldm / "projection_model"),
        # diffusers' generation loop needs the LM-head class (see jointdit/codecs/audio_prompt.py)
        language_model=GPT2LMHeadModel.from_pretrained(aldm / "language_model", **f32),
        tokenizer=RobertaTokenizer.from_pretrained(aldm / "tokenizer"),
        tokenizer_2=T5Tokenizer.from_pretrained(aldm / "tokenizer_2"),
        feature_extractor=ClapFeatureExtractor.from_pretrained(aldm / "feature_extractor"),
        unet=AudioLDM2UNet2DConditionModel.from_pretrained(aldm / "unet"),
        scheduler=DDIMScheduler.from_pretrained(aldm / "scheduler"),
        vocoder=SpeechT5HifiGan.from_pretrained(aldm / "vocoder", **f32),
    )
