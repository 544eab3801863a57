"""AudioPromptEncoder gives the audio expert exactly what AudioLDM2Pipeline feeds its UNet."""

import fnmatch

import pytest
import torch
from diffusers.pipelines.audioldm2 import AudioLDM2UNet2DConditionModel
from transformers import GPT2Model

from jointdit.codecs.audio_prompt import TEXT_PARTS, AudioPromptEncoder
from jointdit.codecs.fetch import FOLDER_PATTERNS
from jointdit.errors import UserError
from jointdit.random_experts import T5_MAX, audioldm2_pipeline, write_experts

SHORT, LONG = "a dog barks", "a loud dog barks and a cat meows"
# diffusers' generation loop still passes GPT-2 `past_key_values` (the encoder hides this too)
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values:FutureWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tiny experts root, encoder, diffusers' AudioLDM2Pipeline on the same folder)."""
    root = write_experts(tmp_path_factory.mktemp("tiny_experts"))
    return root, AudioPromptEncoder.from_pretrained(root / "audioldm2"), audioldm2_pipeline(root)


def pipeline_encoding(pipe, prompt: str, negative: str | None = None) -> dict:
    """encode_prompt as AudioLDM2Pipeline.__call__ runs it (under no_grad), split in halves."""
    with torch.no_grad():
        states, mask, tokens = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
    null, cond = 0, 1  # the pipeline stacks [unconditional, conditional]
    return {
        "audio_cond": tokens[cond],
        "audio_cond_1": states[cond],
        "audio_cond_1_mask": mask[cond],
        "null_audio_cond": tokens[null],
        "null_audio_cond_1": states[null],
        "null_audio_cond_1_mask": mask[null],
    }


def assert_same_as_pipeline(enc: dict, ref: dict) -> None:
    """Equal GPT-2 tokens; T5 states and mask equal up to the pipeline's length, zeros after."""
    for side in ("", "null_"):
        tokens, states, mask = (f"{side}audio_cond{k}" for k in ("", "_1", "_1_mask"))
        assert torch.equal(enc[tokens], ref[tokens])
        length = ref[states].shape[0]
        assert torch.equal(enc[states][:length], ref[states])
        assert torch.equal(enc[mask][:length], ref[mask])
        assert not enc[states][length:].any() and not enc[mask][length:].any()


def test_encoding_is_the_pipelines(world):
    _, encoder, pipe = world
    enc = encoder.encode(SHORT)
    assert encoder.max_length == T5_MAX
    shapes = {
        "audio_cond": (8, encoder.token_dim),
        "audio_cond_1": (T5_MAX, encoder.state_dim),
        "audio_cond_1_mask": (T5_MAX,),
    }
    for key, shape in shapes.items():
        for k in (key, f"null_{key}"):
            assert enc[k].shape == shape and enc[k].device.type == "cpu", k
            assert enc[k].dtype == (torch.int64 if k.endswith("mask") else torch.float32), k
    assert not any(v.requires_grad for v in enc.values())
    assert_same_as_pipeline(enc, pipeline_encoding(pipe, SHORT))


def test_null_side_follows_the_prompts_length(world):
    """The empty prompt is padded to the prompt's T5 length and GPT-2's positions ignore the
    mask, so its generated tokens change with that length, its T5 states do not."""
    _, encoder, pipe = world
    short, long = encoder.encode(SHORT), encoder.encode(LONG)
    assert short["audio_cond_1_mask"].sum() < long["audio_cond_1_mask"].sum()
    assert_same_as_pipeline(long, pipeline_encoding(pipe, LONG))
    assert not torch.allclose(short["null_audio_cond"], long["null_audio_cond"], atol=1e-4)
    assert torch.equal(short["null_audio_cond_1_mask"], long["null_audio_cond_1_mask"])
    real = short["null_audio_cond_1_mask"].bool()
    torch.testing.assert_close(short["null_audio_cond_1"][real], long["null_audio_cond_1"][real])


def test_negative_prompt_replaces_the_empty_one(world):
    _, encoder, pipe = world
    plain, neg = encoder.encode(LONG), encoder.encode(LONG, negative="a cat meows")
    assert_same_as_pipeline(neg, pipeline_encoding(pipe, LONG, negative="a cat meows"))
    assert torch.equal(plain["audio_cond"], neg["audio_cond"])
    assert not torch.allclose(plain["null_audio_cond"], neg["null_audio_cond"], atol=1e-4)
    assert neg["null_audio_cond_1_mask"].sum() > plain["null_audio_cond_1_mask"].sum()


def test_padding_to_max_length_does_not_change_the_unet(world):
    """The pipeline's guidance batch [null, cond] at the prompt's T5 length against the same
    padded to max_length: the mask's -10000 bias gives the extra keys zero weight."""
    root, encoder, pipe = world
    unet = AudioLDM2UNet2DConditionModel.from_pretrained(root / "audioldm2" / "unet").eval()
    ref, enc = pipeline_encoding(pipe, SHORT), encoder.encode(SHORT)
    x = torch.randn(2, 8, 50, 16, generator=torch.Generator().manual_seed(0))

    def run(src: dict):
        with torch.no_grad():
            return unet(
                x,
                torch.tensor(500),
                encoder_hidden_states=torch.stack([src["null_audio_cond"], src["audio_cond"]]),
                encoder_hidden_states_1=torch.stack(
                    [src["null_audio_cond_1"], src["audio_cond_1"]]
                ),
                encoder_attention_mask_1=torch.stack(
                    [src["null_audio_cond_1_mask"], src["audio_cond_1_mask"]]
                ),
                return_dict=False,
            )[0]

    want, got = run(ref), run(enc)
    assert ref["audio_cond_1"].shape[0] < enc["audio_cond_1"].shape[0]  # padding did happen
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_generation_is_audioldm2s(world):
    """diffusers' loop on the LM-head class equals AudioLDM2's definition on the plain GPT2Model
    checkpoint: 8 greedy hidden states, each appended to the input with mask 1, positions
    counted over the whole sequence (a padded middle included)."""
    root, encoder, _ = world
    gpt2 = GPT2Model.from_pretrained(root / "audioldm2" / "language_model").eval()
    embeds = torch.randn(1, 7, encoder.token_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1]])
    with torch.no_grad():
        got = encoder.pipe.generate_language_model(embeds, attention_mask=mask, max_new_tokens=None)
        x, m = embeds, mask
        for _ in range(8):
            last = gpt2(inputs_embeds=x, attention_mask=m).last_hidden_state[:, -1:]
            x, m = torch.cat([x, last], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)
    torch.testing.assert_close(got, x[:, -8:])


@pytest.mark.parametrize("missing", sorted(TEXT_PARTS))
def test_missing_part_names_it(world, tmp_path, missing):
    root = world[0]
    folder = tmp_path / "audioldm2"
    folder.mkdir()
    for sub in TEXT_PARTS:
        if sub != missing:
            (folder / sub).symlink_to(root / "audioldm2" / sub)
    with pytest.raises(UserError, match=f"AudioLDM2 {missing} not found.*make fetch-models") as err:
        AudioPromptEncoder.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_fetch_models_downloads_what_the_text_parts_read(world):
    """Every file of the saved text parts, and the published tokenizers' own files (T5's
    spiece.model, RoBERTa's vocab.json / merges.txt), matches codecs fetch's patterns."""
    root = world[0]
    files = [
        f"{p.parent.name}/{p.name}"
        for sub in TEXT_PARTS
        for p in (root / "audioldm2" / sub).iterdir()
    ]
    files += ["tokenizer_2/spiece.model", "tokenizer/vocab.json", "tokenizer/merges.txt"]
    for name in files:
        assert any(fnmatch.fnmatch(name.split("/")[1], pat) for pat in FOLDER_PATTERNS), name
