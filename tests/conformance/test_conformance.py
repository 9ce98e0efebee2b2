"""Every registered conditioner × every pipeline kind: the contract a conditioner keeps.

For each conditioner (condkit's own and any that registers, such as plugins/fading_clip.py) built
with its `example_options` on each tiny pipeline of `pipeline_cases` (UNet and transformer ones):
- it runs, and every denoiser call (UNet or transformer, each ControlNet) gets exactly the conditioning
  it should: a static conditioner's embeddings, a timestep-aware one's `at_timestep` of the right rows
  in CFG order at that call's timestep, in the unit attach hands conditioners (the scheduler's, σ·1000
  for Flux, whose pipeline passes σ); ControlNets get what the UNet or transformer gets;
- a conditioner that claims to reproduce the pipeline's own prompt encoding draws the same images
  as prompt strings;
- it saves and loads back as one unit, with identical `encode` and `at_timestep` outputs;
- LoRA management (set_adapters, disable_lora, fuse_lora, unload_lora_weights) acts inside attach
  exactly as outside it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig

from condkit import attach, available_conditioners, load_conditioner
from condkit.conditioning.features import plain
from condkit.conditioning.registry import get_conditioner_class
from condkit.pipelines.attach import denoisers
from conformance.pipeline_cases import CASES, PipelineCase, case

PROMPTS = ["a red cube", "a blue ball"]
NEGATIVES = ["", "blurry"]
STEPS = 2
TIMESTEPS_TO_COMPARE = (torch.tensor(999), torch.tensor(500), torch.tensor(0))
CONDITIONERS = available_conditioners()


def pairs(names, cases=CASES) -> list:
    """(conditioner, case) parameters, with ids "name-case"."""
    return [pytest.param(n, c, id=f"{n}-{c.name}") for n in names for c in cases]


def example(name: str, pipe):
    torch.manual_seed(0)  # fresh (untrained) parts such as a new connector are then the same on every pipeline
    return load_conditioner(name, pipe, **get_conditioner_class(name).example_options(pipe))


def run(pipe, pipeline_case: PipelineCase, **inputs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(PROMPTS))]
    return pipe(**inputs, num_inference_steps=STEPS, guidance_scale=5.0, generator=generators, output_type="np",
                **pipeline_case.call_kwargs()).images


class DenoiserSpy:
    """Records (timestep, encoder_hidden_states, pooled) of every call, as the module receives them: the pooled
    vector is a transformer's `pooled_projections` or an SDXL UNet's `added_cond_kwargs["text_embeds"]`."""

    def __init__(self, modules):
        self.calls = {module: [] for module in modules}
        self.handles = [module.register_forward_pre_hook(self._record, with_kwargs=True) for module in modules]

    def _record(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        pooled = kwargs.get("pooled_projections")
        if pooled is None:
            pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        self.calls[module].append((torch.as_tensor(timestep).clone(), kwargs["encoder_hidden_states"].clone(), pooled))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def main_denoiser(pipe, pipeline_case: PipelineCase) -> torch.nn.Module:
    return pipe.transformer if pipeline_case.has_transformer else pipe.unet


def tau(pipeline_case: PipelineCase, timestep: torch.Tensor) -> torch.Tensor:
    """The timestep attach's hooks hand `at_timestep` for a call that got `timestep`: Flux's pipeline passes σ, the
    hook σ·1000; every other pipeline passes the scheduler's timestep (SD3's is σ·1000 already)."""
    return timestep * 1000 if pipeline_case.family == "flux" else timestep


def call_rows(pipeline_case: PipelineCase, positive: torch.Tensor, negative: torch.Tensor, call: int = 0) -> torch.Tensor:
    """The rows denoiser call number `call` sees with guidance on. One call per step with [negative, positive]
    (PAG adds a perturbed copy of the positive), except on Flux: one call with the positive rows, or with true
    CFG two per step, the positive rows then the negative ones."""
    if pipeline_case.family == "flux":
        return plain(negative if call % pipeline_case.calls_per_step == 1 else positive)
    parts = [negative, positive, positive] if pipeline_case.name == "sd-pag" else [negative, positive]
    return plain(torch.cat(parts))


def gets_zero_pooled(module: torch.nn.Module) -> bool:
    """SD3 ControlNets trained with zero pooled projections: their pipeline gives them zeros, whatever the prompt."""
    return bool(getattr(getattr(module, "config", None), "force_zeros_for_pooled_projection", False))


@pytest.mark.parametrize("name, pipeline_case", pairs(CONDITIONERS))
@torch.no_grad()
def test_every_denoiser_call_gets_its_conditioning(name, pipeline_case):
    pipe = pipeline_case.build()
    conditioner = example(name, pipe)
    cond = conditioner.encode(PROMPTS, NEGATIVES)
    with attach(pipe, conditioner):
        spy = DenoiserSpy(denoisers(pipe))  # registered after attach's hooks: sees what the modules get
        try:
            images = run(pipe, pipeline_case, **cond.kwargs())
        finally:
            spy.remove()
    assert images.shape == (len(PROMPTS), 32, 32, 3) and np.isfinite(images).all()

    main_calls = spy.calls[main_denoiser(pipe, pipeline_case)]
    assert len(main_calls) == pipeline_case.calls_per_step * pipe.num_timesteps
    for module, calls in spy.calls.items():
        assert len(calls) == len(main_calls), type(module).__name__
        for call, ((t, hidden, pooled), (main_t, main_hidden, _)) in enumerate(zip(calls, main_calls)):
            assert torch.equal(t, main_t) and torch.equal(hidden, main_hidden)  # a ControlNet gets what the denoiser gets
            rows = call_rows(pipeline_case, cond.prompt_embeds, cond.negative_prompt_embeds, call)
            pooled_rows = None
            if cond.pooled_prompt_embeds is not None:
                pooled_rows = call_rows(pipeline_case, cond.pooled_prompt_embeds, cond.negative_pooled_prompt_embeds, call)
            expected, expected_pooled = rows, pooled_rows
            if conditioner.timestep_aware:
                mapped = conditioner.at_timestep(rows, tau(pipeline_case, t))
                expected, expected_pooled = mapped if isinstance(mapped, tuple) else (mapped, pooled_rows)
            assert torch.equal(hidden, expected.to(hidden.dtype)), (name, call)
            if pooled is not None:
                if gets_zero_pooled(module):
                    expected_pooled = torch.zeros_like(pooled)
                assert torch.equal(pooled, expected_pooled.to(pooled.dtype)), (name, call)


@pytest.mark.parametrize(
    "name, pipeline_case", pairs([n for n in CONDITIONERS if get_conditioner_class(n).reproduces_pipeline_prompts])
)
@torch.no_grad()
def test_a_conditioner_that_reproduces_prompts_draws_what_strings_draw(name, pipeline_case):
    pipe = pipeline_case.build()
    conditioner = example(name, pipe)
    with attach(pipe, conditioner):
        ours = run(pipe, pipeline_case, **conditioner.encode(PROMPTS, NEGATIVES).kwargs())
    theirs = run(pipe, pipeline_case, prompt=PROMPTS, negative_prompt=NEGATIVES)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name, pipeline_case", pairs(CONDITIONERS))
@torch.no_grad()
def test_saves_and_loads_as_one_unit(name, pipeline_case, tmp_path):
    pipe = pipeline_case.build()
    conditioner = example(name, pipe)
    folder = conditioner.save_pretrained(tmp_path / "saved")
    loaded = load_conditioner(folder, pipe)
    assert type(loaded) is type(conditioner) and loaded.config == conditioner.config
    before, after = conditioner.encode(PROMPTS, NEGATIVES), loaded.encode(PROMPTS, NEGATIVES)
    assert before.tensors().keys() == after.tensors().keys()
    for key, tensor in before.tensors().items():
        assert torch.equal(tensor, after.tensors()[key]), key
    if conditioner.timestep_aware:
        rows = call_rows(pipeline_case, before.prompt_embeds, before.negative_prompt_embeds)
        for t in TIMESTEPS_TO_COMPARE:
            expected, got = conditioner.at_timestep(rows, t), loaded.at_timestep(rows, t)
            for a, b in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
                assert torch.equal(a, b), int(t)


def add_lora(denoiser: torch.nn.Module) -> None:
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    denoiser.add_adapter(config, adapter_name="style")


LORA_STEPS = {
    "set_adapters": lambda pipe: pipe.set_adapters(["style"], [0.5]),
    "disable_lora": lambda pipe: pipe.disable_lora(),
    "fuse_lora": lambda pipe: pipe.fuse_lora(lora_scale=0.5),
    "unload_lora_weights": lambda pipe: pipe.unload_lora_weights(),
}


LORA_CASES = [case(name) for name in ("sd-txt2img", "sdxl-txt2img", "sd3-txt2img", "flux-txt2img")]


@pytest.mark.parametrize("name, pipeline_case", pairs(CONDITIONERS, LORA_CASES))
@torch.no_grad()
def test_lora_management_inside_attach_acts_as_outside(name, pipeline_case):
    outside, inside = pipeline_case.build(), pipeline_case.build()
    for pipe in (outside, inside):
        add_lora(main_denoiser(pipe, pipeline_case))
    conditioner_outside, conditioner_inside = example(name, outside), example(name, inside)
    cond = conditioner_outside.encode(PROMPTS, NEGATIVES)
    with attach(outside, conditioner_outside):
        with_lora = run(outside, pipeline_case, **cond.kwargs())
    for step, manage in LORA_STEPS.items():
        manage(outside)
        with attach(outside, conditioner_outside):
            expected = run(outside, pipeline_case, **cond.kwargs())
        with attach(inside, conditioner_inside):
            manage(inside)
            got = run(inside, pipeline_case, **cond.kwargs())
        assert np.array_equal(expected, got), step
        assert np.abs(expected - with_lora).max() > 1e-4 or step == "unload_lora_weights", step  # the step did something
    assert not getattr(main_denoiser(inside, pipeline_case), "peft_config", None)
