"""AudioLDM2's own prompt encoding: the conditioning its UNet (the audio expert) was trained on.

CLAP's pooled text embedding and FLAN-T5's token states go through AudioLDM2's projection model
into GPT-2, which generates 8 hidden states. The UNet cross-attends to those 8 tokens
(`encoder_hidden_states`) and to the T5 states with their mask (`encoder_hidden_states_1`).
The numbers come from diffusers' own `AudioLDM2Pipeline.encode_prompt`, so a JointDiT sample
sees exactly what `AudioLDM2Pipeline` would feed its UNet.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AudioLDM2Pipeline
from diffusers.pipelines.audioldm2 import AudioLDM2ProjectionModel
from transformers import AutoTokenizer, ClapModel, GPT2LMHeadModel, T5EncoderModel

from jointdit.codecs.loading import require_folder
from jointdit.errors import UserError

# The text parts of an AudioLDM2 pipeline folder and the file each one must hold.
TEXT_PARTS = {
    "text_encoder": "config.json",  # ClapModel
    "text_encoder_2": "config.json",  # T5EncoderModel (FLAN-T5-large)
    "projection_model": "config.json",  # AudioLDM2ProjectionModel
    "language_model": "config.json",  # GPT2Model
    "tokenizer": "tokenizer_config.json",  # RoBERTa (CLAP's)
    "tokenizer_2": "tokenizer_config.json",  # T5
}
# A tokenizer without model_max_length reports a huge sentinel; T5 would then never truncate.
_NO_LIMIT = 1_000_000


class AudioPromptEncoder:
    """One prompt -> AudioLDM2's UNet conditioning, for the prompt and its unconditional twin.

    With classifier-free guidance, AudioLDM2 pads the unconditional prompt's T5 tokens to the
    prompt's T5 length, and GPT-2's position ids do not follow that padding mask, so the
    unconditional GPT-2 tokens depend on the prompt's length. `encode` therefore computes both
    sides per prompt, as the pipeline does. T5 states are zero-padded to `max_length` with a
    0/1 mask; the UNet turns the mask into a -10000 bias, so the padding gets zero weight.
    """

    def __init__(
        self,
        text_encoder: ClapModel,
        text_encoder_2: T5EncoderModel,
        projection_model: AudioLDM2ProjectionModel,
        language_model: GPT2LMHeadModel,
        tokenizer,
        tokenizer_2,
        name: str = "",
    ):
        for model in (text_encoder, text_encoder_2, projection_model, language_model):
            model.eval().requires_grad_(False)
        # A pipeline holding only the text parts (diffusers registers None components), so
        # encode_prompt and generate_language_model run as diffusers wrote them.
        self.pipe = AudioLDM2Pipeline(
            vae=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            projection_model=projection_model,
            language_model=language_model,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            feature_extractor=None,
            unet=None,
            scheduler=None,
            vocoder=None,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.name = name
        self.max_length = int(tokenizer_2.model_max_length)
        if self.max_length > _NO_LIMIT:
            raise UserError(
                f"{name}/tokenizer_2/tokenizer_config.json has no model_max_length; set it to the "
                "T5 length AudioLDM2 truncates to (128 in cvssp/audioldm2)"
            )
        self.num_tokens = int(language_model.config.max_new_tokens)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AudioPromptEncoder:
        """Load the text parts of an AudioLDM2 pipeline folder (as `make fetch-models` writes it)."""
        parts = {
            sub: require_folder(Path(folder) / sub, f"AudioLDM2 {sub}", marker)
            for sub, marker in TEXT_PARTS.items()
        }
        # transformers 5 would otherwise take the config's dtype (CLAP's says float64).
        return cls(
            ClapModel.from_pretrained(parts["text_encoder"], dtype=dtype).to(device),
            T5EncoderModel.from_pretrained(parts["text_encoder_2"], dtype=dtype).to(device),
            AudioLDM2ProjectionModel.from_pretrained(
                parts["projection_model"], torch_dtype=dtype
            ).to(device),
            # The checkpoint is a GPT2Model; diffusers needs the LM-head class, whose generation
            # helpers its loop calls (transformers 5 dropped them from GPT2Model: diffusers
            # PR #11244, issue #12630). The GPT2Model weights load into it whole (head tied).
            GPT2LMHeadModel.from_pretrained(parts["language_model"], dtype=dtype).to(device),
            AutoTokenizer.from_pretrained(parts["tokenizer"]),
            AutoTokenizer.from_pretrained(parts["tokenizer_2"]),
            name=str(folder),
        )

    @property
    def token_dim(self) -> int:
        """Width of the GPT-2 tokens (`audio_cond`): the UNet's first cross-attention width."""
        return int(self.pipe.language_model.config.n_embd)

    @property
    def state_dim(self) -> int:
        """Width of the T5 states (`audio_cond_1`): the UNet's second cross-attention width."""
        return int(self.pipe.text_encoder_2.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.pipe.language_model.device

    def _padded(
        self, states: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(l, D) states and (l,) mask -> (max_length, D) float32 and (max_length,) int64."""
        extra = self.max_length - states.shape[0]
        states = F.pad(states.float().cpu(), (0, 0, 0, extra))
        return states, F.pad(mask.long().cpu(), (0, extra))

    @torch.no_grad()
    def encode(self, prompt: str, negative: str = "") -> dict[str, torch.Tensor]:
        """AudioLDM2's conditioning of `prompt` and of its unconditional side (`negative`, or the
        empty prompt), float32 on the CPU, no batch axis:

        audio_cond (8, token_dim), audio_cond_1 (max_length, state_dim), audio_cond_1_mask
        (max_length,) int64; null_audio_cond, null_audio_cond_1, null_audio_cond_1_mask the same
        for the unconditional side, as the pipeline computes it for this prompt.
        """
        with warnings.catch_warnings():  # diffusers' loop still passes GPT-2 `past_key_values`
            warnings.filterwarnings("ignore", ".*past_key_values", FutureWarning)
            states, mask, tokens = self.pipe.encode_prompt(
                prompt,
                self.device,
                num_waveforms_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative or None,  # None: the pipeline's own "" default
            )
        # The pipeline stacks [unconditional, conditional] along the batch.
        null_1, null_mask = self._padded(states[0], mask[0])
        cond_1, cond_mask = self._padded(states[1], mask[1])
        return {
            "audio_cond": tokens[1].float().cpu(),
            "audio_cond_1": cond_1,
            "audio_cond_1_mask": cond_mask,
            "null_audio_cond": tokens[0].float().cpu(),
            "null_audio_cond_1": null_1,
            "null_audio_cond_1_mask": null_mask,
        }
