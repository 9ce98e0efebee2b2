"""Connector and projection training on the shared loop: only the adapter trains, the saved module
plugs into its conditioner unchanged, language-model features are computed once per caption."""

import json

import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertModel

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.concat import ConcatConditioner
from condkit.conditioning.ella_connector import TimestepAwareConnector
from condkit.conditioning.llm_adapter import LLMAdapterConditioner, hidden_state_model
from condkit.conditioning.projection import CLP, ProjectedConditioner, WiCLP
from condkit.pipelines.attach import attach
from condkit.conditioning.registry import load_conditioner
from condkit.shapes_world.dataset import adapter_dataset
from condkit.training.adapter_runs import run_adapter_training
from condkit.training.adapters import ConnectorTraining, ProjectionTraining
from condkit.training.loop import TrainingConfig, train
from condkit.training.method import TrainingBatch
from condkit.training.unet_call import predict
from tiny_models import byte_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline

LM_WIDTH = 24
CAPTIONS = ["a red circle", "a blue square left of a green triangle", "two yellow stars"]



def tiny_language_model(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(byte_tokenizer()), hidden_size=LM_WIDTH, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48)
    return BertModel(config).eval()


def small_connector(width: int = 32, pooled_dim: int | None = None, seed: int = 0) -> TimestepAwareConnector:
    torch.manual_seed(seed)
    return TimestepAwareConnector(text_dim=LM_WIDTH, width=width, num_latents=8, num_heads=4, num_blocks=2,
                                  time_channels=32, time_embed_dim=32, pooled_dim=pooled_dim)


def images_with_captions(count: int = 6) -> list[dict]:
    """Coloured squares; captions cycle through CAPTIONS, so each appears count / 3 times."""
    colours = [(200, 30, 30), (30, 30, 200), (220, 220, 40)]
    return [{"image": Image.new("RGB", (32, 32), colours[i % 3]), "caption": CAPTIONS[i % 3]} for i in range(count)]


def config(tmp_path, steps: int, **overrides) -> TrainingConfig:
    settings = dict(output_dir=tmp_path, max_train_steps=steps, train_batch_size=2, learning_rate=1e-2,
                    show_progress=False, checkpointing_steps=2, seed=0)
    return TrainingConfig(**{**settings, **overrides})


def connector_setup(pipe, concat_clip: bool = False, flexible_length: bool = True, language_model=None):
    """(ConnectorTraining, the conditioner its connector sits in)."""
    pooled_dim = 32 if hasattr(pipe, "text_encoder_2") else None
    connector = small_connector(pipe.unet.config.cross_attention_dim, pooled_dim)
    adapter = LLMAdapterConditioner.from_pipeline(pipe, byte_tokenizer(), language_model or tiny_language_model(), connector,
                                                  flexible_length=flexible_length, max_length=40)
    conditioner = ConcatConditioner(adapter, CLIPConditioner.from_pipeline(pipe)) if concat_clip else adapter
    return ConnectorTraining(connector), conditioner


def projection_setup(pipe, projection, switch_off_timestep: int, **options):
    """(ProjectionTraining, the ProjectedConditioner its projection sits in)."""
    conditioner = ProjectedConditioner.from_pipeline(pipe, projection, switch_off_timestep=switch_off_timestep)
    return ProjectionTraining(projection, **options), conditioner


def adapter(conditioner) -> LLMAdapterConditioner:
    return conditioner.first if isinstance(conditioner, ConcatConditioner) else conditioner


def snapshot(*modules) -> list[dict[str, torch.Tensor]]:
    return [{name: tensor.clone() for name, tensor in module.state_dict().items()} for module in modules]


def assert_unchanged(modules, before) -> None:
    for module, saved in zip(modules, before):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, saved[name]), name


def frozen_modules(pipe) -> list[torch.nn.Module]:
    return [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
@pytest.mark.parametrize("concat_clip", [False, True])
def test_connector_training_changes_only_the_connector(tmp_path, make_pipe, concat_clip):
    pipe = make_pipe()
    method, conditioner = connector_setup(pipe, concat_clip)
    frozen = frozen_modules(pipe) + [adapter(conditioner).language_model]
    before = snapshot(*frozen)
    connector_before = snapshot(method.connector)[0]
    assert set(method.trainable_state_dict()) == {f"connector.{name}" for name, _ in method.connector.named_parameters()}

    result = train(method, pipe.unet, pipe.vae, pipe.scheduler, images_with_captions(4), config(tmp_path, 3), conditioner=conditioner)

    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert_unchanged(frozen, before)
    changed = [name for name, tensor in method.connector.state_dict().items() if not torch.equal(tensor, connector_before[name])]
    assert "connector.latents" in changed and "connector.proj_in.weight" in changed


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline])
@pytest.mark.parametrize("projection_class", [CLP, WiCLP])
def test_projection_training_changes_only_the_projection(tmp_path, make_pipe, projection_class):
    pipe = make_pipe()
    projection = projection_class(pipe.unet.config.cross_attention_dim)
    initial = snapshot(projection)[0]
    method, conditioner = projection_setup(pipe, projection, switch_off_timestep=100)
    before = snapshot(*frozen_modules(pipe))

    result = train(method, pipe.unet, pipe.vae, pipe.scheduler, images_with_captions(4), config(tmp_path, 3), conditioner=conditioner)

    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert_unchanged(frozen_modules(pipe), before)
    assert all(not torch.equal(tensor, initial[name]) for name, tensor in projection.state_dict().items())


def test_projection_applies_above_the_switch_off_only():
    pipe = tiny_sd_pipeline()
    projection = CLP(32)
    with torch.no_grad():
        projection.linear.weight.add_(0.1 * torch.randn(32, 32))
    method, conditioner = projection_setup(pipe, projection, switch_off_timestep=500)
    timesteps = torch.tensor([900, 500, 100])
    hidden, _ = conditioner.denoiser_inputs(CAPTIONS, timesteps)
    plain = conditioner.conditioner.embed(CAPTIONS).prompt_embeds
    assert torch.equal(hidden[1:], plain[1:])
    assert torch.allclose(hidden[0], projection(plain[0]), atol=1e-6) and not torch.allclose(hidden[0], plain[0])

    # Rows at or below τ carry no gradient to the projection; rows above it do.
    hidden[1:].square().sum().backward()
    assert projection.linear.weight.grad.abs().max() == 0
    conditioner.denoiser_inputs(CAPTIONS, timesteps)[0][:1].square().sum().backward()
    assert projection.linear.weight.grad.abs().max() > 0

    everywhere = ProjectionTraining(projection, project_all_timesteps=True)
    noisy, batch = unet_inputs()
    with torch.no_grad():
        expected = predict(pipe.unet, noisy, timesteps, projection(plain), None, batch.image_size)
        assert torch.allclose(everywhere(pipe.unet, conditioner, batch, noisy, timesteps), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["connector", "projection"])
def test_resume_continues_the_same_curve(tmp_path, kind):
    def run(output_dir, steps, resume=None):
        pipe = tiny_sd_pipeline()
        if kind == "connector":
            method, conditioner = connector_setup(pipe, concat_clip=True)
        else:
            method, conditioner = projection_setup(pipe, WiCLP(32), switch_off_timestep=300)
        settings = config(output_dir, steps, resume_from_checkpoint=resume)
        losses = train(method, pipe.unet, pipe.vae, pipe.scheduler, images_with_captions(6), settings, conditioner=conditioner).losses
        return losses, method

    straight, straight_method = run(tmp_path / "straight", 4)
    first_half, _ = run(tmp_path / "resumed", 2)
    second_half, resumed_method = run(tmp_path / "resumed", 4, resume="latest")
    assert first_half + second_half == straight
    for name, tensor in straight_method.trainable_state_dict().items():
        assert torch.equal(tensor, resumed_method.trainable_state_dict()[name]), name


def unet_inputs() -> tuple[torch.Tensor, TrainingBatch]:
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(len(CAPTIONS), 4, 16, 16, generator=generator)
    batch = TrainingBatch(indices=torch.arange(len(CAPTIONS)), captions=CAPTIONS, latents=None, noise=None, step=0,
                          image_size=(32, 32))
    return noisy, batch


@pytest.mark.parametrize("kind", ["connector", "connector+clip", "clp", "wiclp"])
@torch.no_grad()
def test_trained_conditioner_saves_loads_and_draws_what_training_saw(tmp_path, tiny_language_model_folder, kind):
    pipe = tiny_sd_pipeline()
    if kind.startswith("connector"):
        language_model = BertModel.from_pretrained(tiny_language_model_folder).eval()
        method, conditioner = connector_setup(pipe, kind == "connector+clip", language_model=language_model)
    else:
        method, conditioner = projection_setup(pipe, {"clp": CLP, "wiclp": WiCLP}[kind](32), switch_off_timestep=400)
    with torch.enable_grad():
        train(method, pipe.unet, pipe.vae, pipe.scheduler, images_with_captions(4), config(tmp_path / "run", 2),
              conditioner=conditioner)
    loaded = load_conditioner(conditioner.save_pretrained(tmp_path / "saved"), pipe)

    timesteps = torch.tensor([999, 420, 3])
    noisy, batch = unet_inputs()
    features = loaded.encode(CAPTIONS).prompt_embeds
    with attach(pipe, loaded):
        attached = pipe.unet(noisy, timesteps, features).sample
    assert torch.equal(attached, method(pipe.unet, conditioner, batch, noisy, timesteps))


@pytest.mark.parametrize("flexible_length", [False, True])
def test_language_features_are_computed_once_per_caption(tmp_path, flexible_length):
    pipe = tiny_sd_pipeline()
    method, conditioner = connector_setup(pipe, flexible_length=flexible_length)
    encoded_rows = []
    hidden_state_model(conditioner.language_model).register_forward_hook(
        lambda module, args, kwargs, output: encoded_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    dataset = images_with_captions(6)
    train(method, pipe.unet, pipe.vae, pipe.scheduler, dataset, config(tmp_path, 5), conditioner=conditioner)
    assert sum(encoded_rows) == len(CAPTIONS) + 1  # 5 steps × 2 images drew every caption, each encoded once, and ""
    assert set(conditioner.feature_cache) == {*CAPTIONS, ""}
    expected = conditioner.encode(CAPTIONS[1]).prompt_embeds[0]
    assert torch.allclose(conditioner.feature_cache[CAPTIONS[1]], expected[: conditioner.feature_cache[CAPTIONS[1]].shape[0]], atol=1e-6)


@pytest.fixture
def tiny_model_folder(tmp_path):
    folder = tmp_path / "tiny-sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_language_model_folder(tmp_path):
    folder = tmp_path / "tiny-lm"
    tiny_language_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, options", [
    ("projection", {"projection": "clp"}),
    ("llm", {"concat_clip": True, "num_latents": 4, "num_blocks": 1}),
])  # fmt: skip
def test_run_adapter_training_saves_a_pluggable_folder(tmp_path, tiny_model_folder, tiny_language_model_folder, kind, options):
    if kind == "llm":
        options = {**options, "language_model": tiny_language_model_folder}
    common = dict(model=tiny_model_folder, dataset=adapter_dataset(6), batch_size=2, checkpointing_steps=2)
    folder = run_adapter_training(kind, tmp_path / "run", steps=2, **common, **options)
    assert (folder / "conditioner_config.json").is_file()
    with pytest.raises(FileExistsError, match="already exists"):
        run_adapter_training(kind, tmp_path / "run", steps=2, **common, **options)
    run_adapter_training(kind, tmp_path / "run", steps=3, resume=True, **common, **options)
    log = [json.loads(line) for line in (tmp_path / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]

    from condkit.pipelines.loading import load_pipeline

    pipe = load_pipeline(tiny_model_folder, "cpu", "float32")
    conditioner = load_conditioner(folder, pipe)
    assert isinstance(conditioner, ConcatConditioner if kind == "llm" else ProjectedConditioner)
    cond = conditioner.encode("a red circle")
    with attach(pipe, conditioner):
        images = pipe(**cond.kwargs(), num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_run_adapter_training_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown adapter kind 'lora'"):
        run_adapter_training("lora", tmp_path)
    with pytest.raises(ValueError, match="unknown projection 'mlp'"):
        run_adapter_training("projection", tmp_path, projection="mlp")
    with pytest.raises(ValueError, match="apply to kind 'llm' only"):
        run_adapter_training("projection", tmp_path, concat_clip=True)
    with pytest.raises(ValueError, match="no dataset given"):
        run_adapter_training("llm", tmp_path)
    with pytest.raises(ValueError, match="dataset_size must be a positive integer, got 0"):
        adapter_dataset(0)


@torch.no_grad()
def test_frozen_encoders_ignore_the_training_autocast():
    pipe = tiny_sd_pipeline()
    _, conditioner = connector_setup(pipe, concat_clip=True)
    clip = conditioner.second
    plain_clip, _ = clip.denoiser_inputs(CAPTIONS, torch.tensor([500]))
    plain_features = adapter(conditioner).embed(CAPTIONS).prompt_embeds
    adapter(conditioner).clear_feature_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clip_hidden, _ = clip.denoiser_inputs(CAPTIONS, torch.tensor([500]))
        conditioner.denoiser_inputs(CAPTIONS, torch.tensor([500]))  # encodes the captions again, under autocast
    features = adapter(conditioner).embed(CAPTIONS).prompt_embeds  # from the cache filled under autocast
    assert features.dtype == clip_hidden.dtype == torch.float32
    assert torch.equal(features, plain_features) and torch.equal(clip_hidden, plain_clip)
