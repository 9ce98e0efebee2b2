"""CLP / WiCLP and ProjectedConditioner: identity at start, switch-off at τ, negatives untouched."""

import pytest
import torch

from condkit.conditioning.registry import get_conditioner_class
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.projection import CLP, WiCLP, ProjectedConditioner, load_projection
from condkit.pipelines.attach import attach
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

WIDTH = 32  # the tiny SD text encoder's hidden size
PROMPTS = ["a red circle", "two blue squares"]



@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def clip(sd):
    return CLIPConditioner.from_pipeline(sd)


def trained(projection: CLP | WiCLP, seed: int = 0) -> CLP | WiCLP:
    """Stand-in for a trained projection: every weight moved away from its identity initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in projection.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return projection.eval()


def cfg_rows(cond) -> torch.Tensor:
    """What the proxy receives with classifier-free guidance: [negative, positive]."""
    return torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])


def test_registered_as_projected():
    assert get_conditioner_class("projected") is ProjectedConditioner


@pytest.mark.parametrize("projection_class", [CLP, WiCLP])
@torch.no_grad()
def test_identity_at_initialisation(clip, projection_class):
    conditioner = ProjectedConditioner(clip, projection_class(WIDTH), switch_off_timestep=0)
    plain = clip.encode(PROMPTS, "blurry")
    mapped = conditioner.at_timestep(cfg_rows(conditioner.encode(PROMPTS, "blurry")), torch.tensor(999))
    assert torch.equal(mapped, cfg_rows(plain))


@torch.no_grad()
def test_switch_off_happens_at_tau(clip):
    projection = trained(CLP(WIDTH))
    conditioner = ProjectedConditioner(clip, projection, switch_off_timestep=500)
    features = conditioner.encode(PROMPTS).prompt_embeds  # no CFG: positive rows only
    plain = clip.encode(PROMPTS).prompt_embeds
    projected = projection(plain)
    assert not torch.allclose(projected, plain)
    assert torch.equal(conditioner.at_timestep(features, torch.tensor(501)), projected)
    assert torch.equal(conditioner.at_timestep(features, torch.tensor(500)), plain)
    assert torch.equal(conditioner.at_timestep(features, torch.tensor(20)), plain)
    per_row = conditioner.at_timestep(features, torch.tensor([900, 100]))
    assert torch.equal(per_row[0], projected[0]) and torch.equal(per_row[1], plain[1])


@torch.no_grad()
def test_negative_half_is_never_projected(clip):
    projection = trained(WiCLP(WIDTH))
    conditioner = ProjectedConditioner(clip, projection, switch_off_timestep=100)
    # The negative text equals the first prompt: rows that look alike must still be told apart.
    cond = conditioner.encode(PROMPTS, [PROMPTS[0], "blurry"], num_images_per_prompt=2)
    plain = clip.encode(PROMPTS, [PROMPTS[0], "blurry"], num_images_per_prompt=2)
    mapped = conditioner.at_timestep(cfg_rows(cond), torch.tensor(999))
    assert torch.equal(mapped[:4], plain.negative_prompt_embeds)
    assert torch.equal(mapped[4:], projection(plain.prompt_embeds))
    # The pipeline may repeat rows per image itself; the marker travels with each row.
    repeated = cfg_rows(cond).repeat_interleave(3, dim=0)
    assert torch.equal(conditioner.at_timestep(repeated, torch.tensor(999)), mapped.repeat_interleave(3, dim=0))


@torch.no_grad()
def test_unet_sees_projection_only_early_and_only_on_the_positive_half(sd, clip):
    projection = trained(CLP(WIDTH))
    conditioner = ProjectedConditioner.from_pipeline(sd, projection, switch_off_timestep=500)
    seen = []
    cond = conditioner.encode("a red circle", "blurry")
    with attach(sd, conditioner):  # the spy, registered after attach's hook, sees what the UNet gets
        hook = sd.unet.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((args[1], kwargs["encoder_hidden_states"])), with_kwargs=True
        )
        try:
            sd(**cond.kwargs(), num_inference_steps=4, height=32, width=32, output_type="np")
            sd(**cond.kwargs(), num_inference_steps=4, guidance_scale=1.0, height=32, width=32, output_type="np")
        finally:
            hook.remove()
    plain = clip.encode("a red circle", "blurry")
    timesteps = [int(t) for t in sd.scheduler.timesteps]
    assert any(t > 500 for t in timesteps) and any(t <= 500 for t in timesteps)
    assert len(seen) == 8
    for (t, hidden), guided in zip(seen, [True] * 4 + [False] * 4):
        expected_positive = projection(plain.prompt_embeds) if t > 500 else plain.prompt_embeds
        expected = torch.cat([plain.negative_prompt_embeds, expected_positive]) if guided else expected_positive
        assert torch.equal(hidden, expected), (int(t), guided)


@pytest.mark.parametrize("projection_class", [CLP, WiCLP])
@torch.no_grad()
def test_save_and_load_round_trip(tmp_path, projection_class):
    original = trained(projection_class(WIDTH))
    original.save_pretrained(tmp_path / "projection")
    assert (tmp_path / "projection" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_projection(tmp_path / "projection")
    assert type(loaded) is projection_class and loaded.config.dim == WIDTH
    embeds = torch.randn(2, 77, WIDTH)
    assert torch.equal(loaded(embeds), original(embeds))
    assert torch.equal(projection_class.from_pretrained(tmp_path / "projection")(embeds), original(embeds))


@torch.no_grad()
def test_wiclp_mixes_a_window_of_five_tokens():
    projection = trained(WiCLP(8))
    embeds = torch.randn(1, 12, 8)
    nudged = embeds.clone()
    nudged[0, 6] += 1.0
    changed = (projection(nudged) - projection(embeds)).abs().amax(dim=-1)[0] > 0
    assert changed.tolist() == [False] * 4 + [True] * 5 + [False] * 3


def test_projection_for_another_encoder_width_is_refused(clip):
    with pytest.raises(ValueError, match="projection width 768 differs from the conditioner's embedding width 32"):
        ProjectedConditioner(clip, CLP(768))


@pytest.mark.parametrize("tau", [-1, 1000, 1500])
def test_tau_outside_the_scheduler_range_is_refused(sd, tau):
    with pytest.raises(ValueError, match=rf"switch_off_timestep {tau} is outside the scheduler's range \[0, 1000\)"):
        ProjectedConditioner.from_pipeline(sd, CLP(WIDTH), switch_off_timestep=tau)


def test_unmarked_features_are_refused(clip):
    conditioner = ProjectedConditioner(clip, CLP(WIDTH))
    with pytest.raises(ValueError, match="no positive/negative row marker"):
        conditioner.at_timestep(clip.encode("a red circle").prompt_embeds, torch.tensor(999))


@torch.no_grad()
def test_sdxl_projects_both_encoders_and_keeps_the_pooled_vectors():
    sdxl = tiny_sdxl_pipeline()
    projection = trained(CLP(64))
    conditioner = ProjectedConditioner.from_pipeline(sdxl, projection, switch_off_timestep=800)
    cond = conditioner.encode("a red circle", "blurry")
    plain = CLIPConditioner.from_pipeline(sdxl).encode("a red circle", "blurry")
    assert torch.equal(cond.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    assert torch.equal(cond.negative_pooled_prompt_embeds, plain.negative_pooled_prompt_embeds)
    mapped = conditioner.at_timestep(cfg_rows(cond), torch.tensor(900.0))
    assert torch.equal(mapped, torch.cat([plain.negative_prompt_embeds, projection(plain.prompt_embeds)]))
