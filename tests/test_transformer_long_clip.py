"""Long-CLIP on SD3's CLIP-L and CLIP-G and on Flux's CLIP-L (pooled from the 248-token window)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from condkit import load_conditioner
from condkit.conditioning.long_clip import stretch_text_model
from condkit.conditioning.transformer_long_clip import FluxLongCLIPConditioner, SD3LongCLIPConditioner
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

LENGTH = 16
LONG_PROMPT = "a red cube, " * 13  # 156 tokens on the byte tokenizer: two stock windows, one Long-CLIP window


def window_ids(tokenizer, prompt: str, length: int = 248) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


@torch.no_grad()
def test_sd3_clip_l_and_g_read_one_248_token_window(sd3):
    conditioner = load_conditioner("long-clip", sd3, max_sequence_length=LENGTH)
    assert isinstance(conditioner, SD3LongCLIPConditioner)
    assert conditioner.encode("a red cube").prompt_embeds.shape == (1, 77 + LENGTH, 96)  # short: 77 CLIP tokens, as trained
    got = conditioner.encode(LONG_PROMPT)
    assert got.prompt_embeds.shape == (1, 2 * 77 + LENGTH, 96)  # 158 tokens with BOS/EOS: cut at 154... of one window
    stretched = [stretch_text_model(sd3.text_encoder), stretch_text_model(sd3.text_encoder_2)]
    outputs = [encoder(window_ids(tokenizer, LONG_PROMPT), output_hidden_states=True)
               for encoder, tokenizer in zip(stretched, (sd3.tokenizer, sd3.tokenizer_2))]
    clip_states = torch.cat([output.hidden_states[-2][:, :154] for output in outputs], dim=-1)
    torch.testing.assert_close(got.prompt_embeds[:, :154, :64], clip_states, rtol=0, atol=1e-6)
    assert not got.prompt_embeds[:, :154, 64:].any()  # zero padding up to T5's width
    pooled = torch.cat([output.text_embeds for output in outputs], dim=-1)
    torch.testing.assert_close(got.pooled_prompt_embeds, pooled, rtol=0, atol=1e-6)
    plain = load_conditioner("clip", sd3, max_sequence_length=LENGTH).encode(LONG_PROMPT)
    assert torch.equal(got.prompt_embeds[:, 154:], plain.prompt_embeds[:, 154:])  # T5 as before


@torch.no_grad()
def test_flux_pools_clip_l_from_the_248_token_window(flux):
    conditioner = load_conditioner("long-clip", flux, max_sequence_length=LENGTH)
    assert isinstance(conditioner, FluxLongCLIPConditioner)
    got = conditioner.encode(LONG_PROMPT)
    stretched = stretch_text_model(flux.text_encoder)
    expected = stretched(window_ids(flux.tokenizer, LONG_PROMPT)).pooler_output
    torch.testing.assert_close(got.pooled_prompt_embeds, expected, rtol=0, atol=1e-6)
    first_75 = stretched(window_ids(flux.tokenizer, LONG_PROMPT[:75])).pooler_output
    assert not torch.allclose(got.pooled_prompt_embeds, first_75)  # it reads past the stock window
    plain = load_conditioner("clip", flux, max_sequence_length=LENGTH).encode(LONG_PROMPT)
    assert torch.equal(got.prompt_embeds, plain.prompt_embeds)


def save_long_clip_l(folder, hidden_size: int, with_projection: bool = True):
    """A converted Long-CLIP-L (248 positions), as `condkit convert longclip` writes it: with its text_projection."""
    config = tiny_flux_pipeline().text_encoder.config
    config.update({"hidden_size": hidden_size, "max_position_embeddings": 248})
    torch.manual_seed(3)
    (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_saves_and_loads_back_with_a_converted_checkpoint(family, sd3, flux, tmp_path):
    pipe = sd3 if family == "sd3" else flux
    checkpoint = save_long_clip_l(tmp_path / "longclip-l", hidden_size=32)
    conditioner = load_conditioner("long-clip", pipe, text_encoder_path=checkpoint, max_sequence_length=LENGTH)
    loaded = load_conditioner(conditioner.save_pretrained(tmp_path / "saved"), pipe)
    assert type(loaded) is type(conditioner) and loaded.config == conditioner.config
    assert (tmp_path / "saved" / "text_encoder" / "config.json").is_file()
    for name, tensor in conditioner.encode(LONG_PROMPT, "blurry").tensors().items():
        assert torch.equal(tensor, loaded.encode(LONG_PROMPT, "blurry").tensors()[name]), name


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_checkpoint_of_another_width_is_refused_in_one_line(family, sd3, flux, tmp_path):
    checkpoint = save_long_clip_l(tmp_path / "wide", hidden_size=48)
    with pytest.raises(ValueError, match=r"has hidden size 48; the pipeline's encoder it replaces has 32$"):
        load_conditioner("long-clip", sd3 if family == "sd3" else flux, text_encoder_path=checkpoint)


def test_flux_refuses_options_that_do_not_apply(flux):
    with pytest.raises(ValueError, match="pad_to_multiple_of does not apply to Flux"):
        load_conditioner("long-clip", flux, pad_to_multiple_of=77)
    with pytest.raises(ValueError, match="clip_skip=1 does not apply to Flux"):
        load_conditioner("long-clip", flux, clip_skip=1)


def test_sd3_refuses_a_checkpoint_without_text_projection(sd3, tmp_path):
    checkpoint = save_long_clip_l(tmp_path / "bare", hidden_size=32, with_projection=False)
    with pytest.raises(ValueError, match="has no text_projection; SD3's CLIP-L needs it for the pooled vector"):
        load_conditioner("long-clip", sd3, text_encoder_path=checkpoint)
