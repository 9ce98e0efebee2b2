"""Timestep-aware conditioners on SD3 and Flux through attach's hooks on `pipe.transformer`:
projections (CLP/WiCLP) over the SD3/Flux embeddings and the LLM connector, with τ and the connector's
time embedding in one unit on both (σ·1000: Flux's pipeline passes σ, the hook multiplies it back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from condkit import attach, load_conditioner
from condkit.conditioning.features import plain
from condkit.conditioning.flux_clip import FluxCLIPConditioner
from condkit.conditioning.sd3_clip import SD3CLIPConditioner
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red cube", "a blue ball"]
NEGATIVES = ["", "blurry"]
LENGTH = 16
BUILD = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def call_options(family: str) -> dict:
    cfg = {"true_cfg_scale": 2.0, "guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 5.0}
    return dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=LENGTH,
                generator=[torch.Generator().manual_seed(i) for i in range(2)], **cfg)


class TransformerSpy:
    """(timestep, encoder_hidden_states, pooled_projections, txt_ids) of every call, as the transformer gets them."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("txt_ids")
        self.calls.append((kwargs["timestep"].clone(), plain(kwargs["encoder_hidden_states"]).clone(),
                           kwargs["pooled_projections"].clone(), None if ids is None else ids.clone()))


class TimestepRecorder:
    """Wraps a conditioner's at_timestep to record the timesteps it is given."""

    def __init__(self, conditioner):
        self.seen = []
        original = conditioner.at_timestep

        def at_timestep(features, timestep):
            self.seen.append(torch.as_tensor(timestep).flatten()[0].item())
            return original(features, timestep)

        conditioner.at_timestep = at_timestep


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("kind", ["clp", "wiclp"])
@torch.no_grad()
def test_identity_projection_draws_what_prompt_strings_draw(family, kind):
    pipe = BUILD[family]()
    conditioner = load_conditioner("projected", pipe, projection=kind, switch_off_timestep=0, max_sequence_length=LENGTH)
    assert isinstance(conditioner.conditioner, (SD3CLIPConditioner, FluxCLIPConditioner))
    with attach(pipe, conditioner):
        ours = pipe(**conditioner.encode(PROMPTS, NEGATIVES).kwargs(), **call_options(family)).images
    theirs = pipe(PROMPTS, negative_prompt=NEGATIVES, **call_options(family)).images
    if kind == "clp":  # a Linear initialised to the identity rounds; WiCLP adds an exact zero
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    else:
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_projection_switches_off_at_tau_in_sigma_times_1000(family):
    pipe = BUILD[family]()
    torch.manual_seed(0)
    conditioner = load_conditioner("projected", pipe, projection="clp", switch_off_timestep=900, max_sequence_length=LENGTH)
    torch.nn.init.normal_(conditioner.projection.linear.weight, std=0.2)  # no longer the identity
    recorder = TimestepRecorder(conditioner)
    cond = conditioner.encode(PROMPTS, NEGATIVES)
    with attach(pipe, conditioner):
        spy = TransformerSpy(pipe.transformer)
        try:
            pipe(**cond.kwargs(), **call_options(family))
        finally:
            spy.handle.remove()
    schedule = pipe.scheduler.timesteps.tolist()  # σ·1000, e.g. [1000, 500] for two steps
    np.testing.assert_allclose(sorted(set(recorder.seen), reverse=True), schedule, rtol=1e-6)
    unprojected = plain(cond.prompt_embeds)[:, :-1]  # the marker token stripped
    # the positive rows at t = 1000 (> τ) and at t = 500 (< τ): SD3 batches [negative, positive] in one call per
    # step; Flux's true CFG calls the transformer with the positive rows, then the negative ones
    first, last = (spy.calls[0], spy.calls[-1]) if family == "sd3" else (spy.calls[0], spy.calls[-2])
    assert not torch.allclose(first[1][-2:], unprojected)
    assert torch.equal(last[1][-2:], unprojected)
    if family == "flux":
        assert all(ids.shape[0] == hidden.shape[1] for _, hidden, _, ids in spy.calls)  # txt_ids follow the stripped marker


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_llm_connector_feeds_the_transformer_and_its_pooled_projections(family):
    pipe = BUILD[family]()
    torch.manual_seed(0)
    conditioner = load_conditioner("llm-adapter", pipe, connector="new", num_latents=8, num_blocks=1)
    connector = conditioner.connector
    assert connector.config.width == pipe.transformer.config.joint_attention_dim
    assert connector.config.pooled_dim == pipe.transformer.config.pooled_projection_dim
    recorder = TimestepRecorder(conditioner)
    cond = conditioner.encode(PROMPTS, NEGATIVES)
    with attach(pipe, conditioner):
        spy = TransformerSpy(pipe.transformer)
        try:
            images = pipe(**cond.kwargs(), **call_options(family)).images
        finally:
            spy.handle.remove()
    assert np.isfinite(images).all()
    np.testing.assert_allclose(sorted(set(recorder.seen), reverse=True), pipe.scheduler.timesteps.tolist(), rtol=1e-6)
    calls_per_step = 2 if family == "flux" else 1  # Flux's true CFG: a positive and a negative call; SD3 batches them
    assert len(spy.calls) == len(recorder.seen) == calls_per_step * len(pipe.scheduler.timesteps)
    for index, ((timestep, hidden, pooled, ids), seen) in enumerate(zip(spy.calls, recorder.seen)):
        if family == "sd3":
            rows = plain(torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]))
        else:
            rows = plain(cond.prompt_embeds if index % 2 == 0 else cond.negative_prompt_embeds)
        expected_hidden, expected_pooled = conditioner.at_timestep(rows, torch.tensor(seen))
        assert hidden.shape[1] == 8 and torch.equal(hidden, expected_hidden) and torch.equal(pooled, expected_pooled)
        if family == "flux":
            assert ids.shape == (8, 3) and not ids.any()


def test_projected_over_sd3_saves_and_loads_as_one_unit(tmp_path):
    pipe = tiny_sd3_pipeline()
    conditioner = load_conditioner("projected", pipe, projection="wiclp", switch_off_timestep=700, max_sequence_length=LENGTH)
    loaded = load_conditioner(conditioner.save_pretrained(tmp_path / "projected"), pipe)
    assert isinstance(loaded.conditioner, SD3CLIPConditioner) and loaded.conditioner.config == conditioner.conditioner.config
    for name, tensor in conditioner.encode(PROMPTS, NEGATIVES).tensors().items():
        assert torch.equal(plain(tensor), plain(loaded.encode(PROMPTS, NEGATIVES).tensors()[name])), name


def controlnet_pipeline(family: str):
    """A tiny SD3 or Flux ControlNet pipeline on the test components."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    from tiny_transformer_models import tiny_flux_components, tiny_sd3_components

    if family == "sd3":
        components = tiny_sd3_components()
        controlnet = SD3ControlNetModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)
        pipe = StableDiffusion3ControlNetPipeline(**components, controlnet=controlnet)
    else:
        components = {k: v for k, v in tiny_flux_components().items() if k not in ("image_encoder", "feature_extractor")}
        controlnet = FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=96, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8])
        pipe = FluxControlNetPipeline(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd3", "flux"])
@torch.no_grad()
def test_the_controlnet_gets_what_the_transformer_gets(family):
    import PIL.Image

    pipe = controlnet_pipeline(family)
    control = PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    conditioner = load_conditioner("projected", pipe, projection="wiclp", switch_off_timestep=0, max_sequence_length=LENGTH)
    options = dict(control_image=control, num_inference_steps=2, height=32, width=32, output_type="np")
    recorder = TimestepRecorder(conditioner)
    calls = []
    with attach(pipe, conditioner):
        handle = pipe.controlnet.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((kwargs["encoder_hidden_states"].shape, kwargs.get("txt_ids"))),
            with_kwargs=True,
        )
        try:
            ours = pipe(**conditioner.encode("a red cube", "blurry").kwargs(), generator=torch.Generator().manual_seed(0),
                        **options).images
        finally:
            handle.remove()
    theirs = pipe("a red cube", negative_prompt="blurry", max_sequence_length=LENGTH, generator=torch.Generator().manual_seed(0),
                  **options).images
    assert np.array_equal(ours, theirs)  # the identity projection, through the transformer's and the ControlNet's hooks
    tokens = 77 + LENGTH if family == "sd3" else LENGTH
    assert [shape[1] for shape, _ in calls] == [tokens] * 2  # the marker stripped
    if family == "flux":
        assert all(ids.shape == (LENGTH, 3) for _, ids in calls)  # txt_ids follow
    np.testing.assert_allclose(recorder.seen, pipe.scheduler.timesteps.tolist(), rtol=1e-6)  # one mapping per step, σ·1000
