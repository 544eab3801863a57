"""Random-weight copies of the pretrained experts (SVD, AudioLDM2) and the CLIP text tower.

Tests, benchmarks and `make gpu-check` use them to run the real architectures without any
download: the parity tests compare a fresh JointDiT with diffusers' `StableVideoDiffusionPipeline`
and `AudioLDM2Pipeline` on them, `make gpu-check` does the same at the published size on a GPU.
The weights are random (seeded), so the outputs mean nothing; only their agreement does.

`build_experts(narrow=...)` returns the parts as modules, grouped like the folders `make
fetch-models` writes (`svd`, `audioldm2`, `clip_text`, each keyed by sub-folder); `write_experts`
saves them in that layout with `save_pretrained`, so the loaders under test are the real ones.

- narrow=True: each config is the published one (`jointdit/assets/real_configs/`) with narrowed
  widths: same classes, block layout, attention layout and cross-attention pattern, a few
  channels each. Fast on CPU; float32 parity to 1e-4 (tests/test_expert_parity.py).
- narrow=False: the published configs unchanged (SVD UNet 1.5 B parameters, CLIP ViT-H/14,
  AudioLDM2 UNet 0.35 B, CLAP, FLAN-T5-large, GPT-2, the ViT-H/14 text tower).

Scheduler and feature-extractor configs are the published files verbatim. No vocabulary files
exist offline, so AudioLDM2's tokenizers are small hand-made ones covering English letters,
digits and a few words ("a dog barks", "" work) at either size: a tokenizer only maps text to
ids, and those ids stay within the published vocabularies (checked). The CLIP text tower uses
the real CLIP vocabulary shipped in the repo.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

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
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedModel,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from jointdit.codecs import AudioCodec, AudioPromptEncoder, Codecs, ConditionEncoder, VideoCodec
from jointdit.codecs.clip_tokenizer import build_clip_tokenizer
from jointdit.codecs.tiny import CLIP_TEXT
from jointdit.model.sizes import AUDIOLDM2_REPO as AUDIOLDM2_REAL
from jointdit.model.sizes import CLIP_REPO as CLIP_REAL
from jointdit.model.sizes import SVD_REPO as SVD_REAL

# Bookkeeping keys of saved configs; the classes write their own.
_DROP = ("_class_name", "_diffusers_version", "_name_or_path", "architectures")
_DROP += ("torch_dtype", "transformers_version")
# Copied as published: they hold no widths.
VERBATIM = (
    ("feature_extractor", "preprocessor_config.json"),
    ("scheduler", "scheduler_config.json"),
)
# The class of every part, by folder and sub-folder (the `make fetch-models` layout). The
# language model is saved as the published GPT2Model; `lm_head_model` wraps it for diffusers.
PARTS: dict[str, dict[str, Any]] = {
    "svd": {
        "unet": UNetSpatioTemporalConditionModel,
        "vae": AutoencoderKLTemporalDecoder,
        "image_encoder": CLIPVisionModelWithProjection,
        "feature_extractor": CLIPImageProcessor,
        "scheduler": EulerDiscreteScheduler,
    },
    "audioldm2": {
        "unet": AudioLDM2UNet2DConditionModel,
        "vae": AutoencoderKL,
        "vocoder": SpeechT5HifiGan,
        "text_encoder": ClapModel,
        "text_encoder_2": T5EncoderModel,
        "projection_model": AudioLDM2ProjectionModel,
        "language_model": GPT2Model,
        "tokenizer": RobertaTokenizer,
        "tokenizer_2": T5Tokenizer,
        "feature_extractor": ClapFeatureExtractor,
        "scheduler": DDIMScheduler,
    },
    "clip_text": {"text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer},
}

# Widths shared across parts (the cross-attention contracts), narrowed.
SVD_CROSS = 32  # SVD UNet cross_attention_dim == image encoder projection_dim
CLAP_PROJ = 16  # CLAP projection_dim == projection model text_encoder_dim
T5_WIDTH = 24  # T5 d_model == projection text_encoder_1_dim == UNet cross width #2
GPT_WIDTH = 32  # GPT-2 n_embd == projection langauge_model_dim == UNet cross width #1
ROBERTA_MAX = 16  # Roberta model_max_length, narrowed; CLAP positions = this + 2
T5_MAX = 16  # T5 model_max_length, narrowed
# The published lengths: RoBERTa's tokenizer_config.json, and the 128 of diffusers' AudioLDM2
# conversion script for T5 (relative positions: T5 itself sets no limit).
ROBERTA_PUBLISHED_MAX = 512
T5_PUBLISHED_MAX = 128

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


def tiny_roberta_tokenizer(max_length: int = ROBERTA_MAX) -> RobertaTokenizer:
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
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = T5_MAX) -> T5Tokenizer:
    """Unigram with T5's specials (<pad> 0, </s> 1, <unk> 2), letters, digits and a few words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in _WORDS]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + ".,'-!?"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _check_fits(tokenizer, vocab_size: int, max_length: int, what: str) -> None:
    """A hand-made tokenizer on a text model: every id it gives must have an embedding row and
    every length it pads to a position."""
    if len(tokenizer) > vocab_size or tokenizer.model_max_length > max_length:
        raise ValueError(
            f"{what}: tokenizer of {len(tokenizer)} ids and length {tokenizer.model_max_length} "
            f"exceeds the model's {vocab_size} embeddings or {max_length} positions"
        )


def lm_head_model(gpt2: GPT2Model) -> GPT2LMHeadModel:
    """`gpt2` inside the LM-head class that diffusers' generation loop needs (see
    jointdit/codecs/audio_prompt.py): its own modules, no copy; the head is tied to its token
    embedding, as loading the GPT2Model checkpoint into GPT2LMHeadModel ties it."""
    with torch.device("meta"):  # the shell's own weights are replaced below
        lm = GPT2LMHeadModel(gpt2.config)
    lm.transformer = gpt2
    lm.lm_head.weight = gpt2.wte.weight
    return lm.eval()


def build_experts(
    narrow: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, Any]]:
    """The parts of SVD, AudioLDM2 and the CLIP text tower with random weights, initialised
    on `device` (float32, then cast to `dtype`), as {folder: {sub-folder: part}}. The same
    seed, device and size give the same weights; each model draws from its own seed, so
    resizing one leaves the others as they were."""

    def seeded(k: int, build):
        torch.manual_seed(seed * 1000 + k)
        with torch.device(device):
            model = build()
        # nn.Module's own cast: diffusers' override warns about float32 modules it has none of
        return torch.nn.Module.to(model, dtype=dtype).eval()

    def config(repo: Path, sub: str, changes: dict) -> dict:
        return {**published(repo, sub), **(changes if narrow else {})}

    # --- SVD: image-to-video expert --------------------------------------------------------
    svd: dict[str, Any] = {}
    cfg = config(SVD_REAL, "unet", SVD_UNET)
    svd["unet"] = seeded(10, lambda: UNetSpatioTemporalConditionModel(**cfg))
    cfg = config(SVD_REAL, "vae", SVD_VAE)
    svd["vae"] = seeded(11, lambda: AutoencoderKLTemporalDecoder(**cfg))
    cfg = CLIPVisionConfig(**config(SVD_REAL, "image_encoder", SVD_IMAGE_ENCODER))
    svd["image_encoder"] = seeded(12, lambda: CLIPVisionModelWithProjection(cfg))
    for sub, _ in VERBATIM:
        svd[sub] = PARTS["svd"][sub].from_pretrained(SVD_REAL / sub)

    # --- AudioLDM2: text-to-audio expert ---------------------------------------------------
    aldm: dict[str, Any] = {}
    if narrow:
        roberta, t5_tok = tiny_roberta_tokenizer(), tiny_t5_tokenizer()
    else:
        roberta = tiny_roberta_tokenizer(ROBERTA_PUBLISHED_MAX)
        t5_tok = tiny_t5_tokenizer(T5_PUBLISHED_MAX)
    cfg = config(AUDIOLDM2_REAL, "unet", AUDIOLDM2_UNET)
    aldm["unet"] = seeded(20, lambda: AudioLDM2UNet2DConditionModel(**cfg))
    cfg = config(AUDIOLDM2_REAL, "vae", AUDIOLDM2_VAE)
    aldm["vae"] = seeded(21, lambda: AutoencoderKL(**cfg))
    cfg = SpeechT5HifiGanConfig(**config(AUDIOLDM2_REAL, "vocoder", VOCODER))
    aldm["vocoder"] = seeded(22, lambda: SpeechT5HifiGan(cfg))
    clap = published(AUDIOLDM2_REAL, "text_encoder")
    for leftover in ("hidden_size", "num_hidden_layers"):  # recomputed by ClapConfig
        clap.pop(leftover)
    if narrow:
        clap["projection_dim"] = CLAP_PROJ
        clap["text_config"] = {**clap["text_config"], **CLAP_TEXT, "vocab_size": len(roberta)}
        clap["audio_config"] = {**clap["audio_config"], **CLAP_AUDIO}
    clap_cfg = ClapConfig(**clap)
    text = clap_cfg.text_config  # RoBERTa positions start after padding_idx 1
    _check_fits(roberta, text.vocab_size, text.max_position_embeddings - 2, "CLAP text")
    aldm["text_encoder"] = seeded(23, lambda: ClapModel(clap_cfg))
    t5 = config(AUDIOLDM2_REAL, "text_encoder_2", T5_ENCODER)
    t5_cfg = T5Config(**(t5 | {"vocab_size": len(t5_tok)} if narrow else t5))
    _check_fits(t5_tok, t5_cfg.vocab_size, T5_PUBLISHED_MAX, "FLAN-T5")
    aldm["text_encoder_2"] = seeded(24, lambda: T5EncoderModel(t5_cfg))
    cfg = config(AUDIOLDM2_REAL, "projection_model", PROJECTION)
    aldm["projection_model"] = seeded(25, lambda: AudioLDM2ProjectionModel(**cfg))
    cfg = GPT2Config(**config(AUDIOLDM2_REAL, "language_model", GPT2))
    aldm["language_model"] = seeded(26, lambda: GPT2Model(cfg))
    aldm["tokenizer"], aldm["tokenizer_2"] = roberta, t5_tok
    for sub, _ in VERBATIM:
        aldm[sub] = PARTS["audioldm2"][sub].from_pretrained(AUDIOLDM2_REAL / sub)

    # --- CLIP text tower: narrowed, build_tiny_codecs(seed).text_encoder (its seed slot 4) ---
    if narrow:
        cfg = CLIPTextConfig(**CLIP_TEXT)
    else:  # the text tower of the full CLIPModel config, as `make fetch-models` splits it
        full = published(CLIP_REAL, ".")
        text = {k: v for k, v in full["text_config"].items() if k != "model_type"}
        cfg = CLIPTextConfig(**{**text, "projection_dim": full["projection_dim"]})
    clip = {
        "text_encoder": seeded(4, lambda: CLIPTextModelWithProjection(cfg)),
        "tokenizer": build_clip_tokenizer(cfg.max_position_embeddings),
    }
    return {"svd": svd, "audioldm2": aldm, "clip_text": clip}


def write_experts(root: Path, seed: int = 0, narrow: bool = True) -> Path:
    """Write SVD, AudioLDM2 and CLIP-text folders under `root` (float32, CPU); the same seed
    gives the same weights. The configs without widths are copied byte for byte."""
    root = Path(root)
    real = {"svd": SVD_REAL, "audioldm2": AUDIOLDM2_REAL}
    for folder, parts in build_experts(narrow, seed).items():
        for sub, part in parts.items():
            dest = root / folder / sub
            name = dict(VERBATIM).get(sub)
            if name:
                dest.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes((real[folder] / sub / name).read_bytes())
            else:
                part.save_pretrained(dest)
    return root


def config_overrides(root: Path) -> list[str]:
    """`model.*` / `codecs.*` overrides pointing a real-path config (configs/stage_a.yaml) at
    narrowed experts written under `root`: their UNets, codecs and widths."""
    root = Path(root)
    return [
        f"model.video_unet={root}/svd/unet",
        f"model.audio_unet={root}/audioldm2/unet",
        f"model.image_emb_dim={SVD_CROSS}",
        f"model.text_emb_dim={CLIP_TEXT['hidden_size']}",
        f"codecs.video_vae={root}/svd/vae",
        f"codecs.image_encoder={root}/svd/image_encoder",
        f"codecs.feature_extractor={root}/svd/feature_extractor",
        f"codecs.audio_vae={root}/audioldm2/vae",
        f"codecs.vocoder={root}/audioldm2/vocoder",
        f"codecs.text_encoder={root}/clip_text/text_encoder",
        f"codecs.tokenizer={root}/clip_text/tokenizer",
        f"codecs.audio_prompt={root}/audioldm2",
    ]


def load_experts(root: Path, folder: str) -> dict[str, Any]:
    """The parts of one folder written by `write_experts`, loaded in float32 on the CPU."""
    out = {}
    for sub, cls in PARTS[folder].items():
        path = Path(root) / folder / sub
        # transformers 5 would otherwise follow config.dtype
        kw = dict(dtype=torch.float32) if issubclass(cls, PreTrainedModel) else {}
        out[sub] = cls.from_pretrained(path, **kw)
    return out


def _parts(experts: Path | dict, folder: str) -> dict[str, Any]:
    return experts[folder] if isinstance(experts, dict) else load_experts(experts, folder)


def svd_pipeline(experts: Path | dict) -> StableVideoDiffusionPipeline:
    """diffusers' SVD pipeline on `build_experts`' modules, or on the parts under a folder
    written by `write_experts` (float32, CPU)."""
    svd = _parts(experts, "svd")
    return StableVideoDiffusionPipeline(**{k: svd[k] for k in PARTS["svd"]})


def audioldm2_pipeline(experts: Path | dict) -> AudioLDM2Pipeline:
    """diffusers' AudioLDM2 pipeline on `build_experts`' modules, or on the parts under a
    folder written by `write_experts` (float32, CPU)."""
    aldm = dict(_parts(experts, "audioldm2"))
    aldm["language_model"] = lm_head_model(aldm["language_model"])
    return AudioLDM2Pipeline(**aldm)


def experts_codecs(experts: dict, decode_chunk: int = 0) -> Codecs:
    """The project's codecs on `build_experts`' modules, where `load_codecs` would load them
    from the folders: same classes, no files."""
    svd, aldm, clip = experts["svd"], experts["audioldm2"], experts["clip_text"]
    fe = svd["feature_extractor"]
    crop = (fe.crop_size["height"], fe.crop_size["width"])
    return Codecs(
        video=VideoCodec(svd["vae"], decode_chunk=decode_chunk, name="random svd/vae"),
        audio=AudioCodec(aldm["vae"], aldm["vocoder"], name="random audioldm2/vae+vocoder"),
        cond=ConditionEncoder(
            svd["image_encoder"],
            clip["text_encoder"],
            clip["tokenizer"],
            crop,
            list(fe.image_mean),
            list(fe.image_std),
            name="random svd/image_encoder+clip_text/text_encoder",
        ),
        prompt=AudioPromptEncoder(
            aldm["text_encoder"],
            aldm["text_encoder_2"],
            aldm["projection_model"],
            lm_head_model(aldm["language_model"]),
            aldm["tokenizer"],
            aldm["tokenizer_2"],
            name="random audioldm2",
        ),
    )
