"""Codecs: video VAE, audio mel VAE + vocoder, CLIP conditions and AudioLDM2's prompt encoding,
loaded from the `codecs` config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jointdit.codecs.audio import AudioCodec
from jointdit.codecs.audio_prompt import AudioPromptEncoder
from jointdit.codecs.conditions import ConditionEncoder
from jointdit.codecs.video import VideoCodec

__all__ = [
    "AudioCodec",
    "AudioPromptEncoder",
    "Codecs",
    "ConditionEncoder",
    "VideoCodec",
    "codec_ids",
    "load_codecs",
]


@dataclass
class Codecs:
    video: VideoCodec
    audio: AudioCodec
    cond: ConditionEncoder
    prompt: AudioPromptEncoder | None = None  # None: codecs.audio_prompt is ""


def load_codecs(cfg_codecs, device="cpu", dtype: torch.dtype = torch.float32) -> Codecs:
    """Load the three codecs from the folders named in the `codecs` config section."""
    c = cfg_codecs
    video = VideoCodec.from_pretrained(
        c.video_vae,
        device,
        dtype,
        decode_chunk=c.video_decode_chunk,
        encode_batch=c.video_encode_batch,
    )
    audio = AudioCodec.from_pretrained(c.audio_vae, c.vocoder, device, dtype)
    cond = ConditionEncoder.from_pretrained(
        c.image_encoder, c.feature_extractor, c.text_encoder, c.tokenizer, device, dtype
    )
    prompt = (
        AudioPromptEncoder.from_pretrained(c.audio_prompt, device, dtype)
        if c.audio_prompt
        else None
    )
    return Codecs(video, audio, cond, prompt)


def codec_ids(cfg_codecs) -> dict[str, str]:
    """The folders the codecs came from, as recorded in cache meta files."""
    keys = ("video_vae", "audio_vae", "vocoder", "image_encoder", "text_encoder", "tokenizer")
    ids = {k: str(cfg_codecs[k]) for k in keys}
    if cfg_codecs.audio_prompt:  # absent when unused, so caches made without it stay valid
        ids["audio_prompt"] = str(cfg_codecs.audio_prompt)
    return ids
