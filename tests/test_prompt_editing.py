"""A1111 prompt editing and alternation: the step -> prompt table, and what the UNet receives at each step.

The tables are A1111's (modules/prompt_parser.py, its doctests, shared/ANCHORS.md) for 10 steps; at step k
the UNet must receive exactly the static encoding of the table's prompt k (and negative k).
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

from condkit import GenerationSettings, PromptRequest, attach, generate, load_conditioner
from condkit.conditioning.features import PipelineFeatures
from condkit.conditioning.prompt_schedule import check_schedule, has_schedule, prompt_table, split_subprompts
from condkit.pipelines.generate import batches_of_equal_shape
from tiny_models import tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_pipeline

FEMALE_MALE = ["female", "male"] * 5

TABLES = {
    # ANCHORS
    "a [b:3]": ["a "] * 3 + ["a b"] * 7,
    "a [b:.5] c": ["a  c"] * 5 + ["a b c"] * 5,
    "a [b : c : 1] d": ["a b  d"] + ["a  c  d"] * 9,
    "a[b:[c:d:2]:1]e": ["abe", "ace"] + ["ade"] * 8,
    "a [unbalanced": ["a [unbalanced"] * 10,
    "[fe|]male": FEMALE_MALE,
    "[fe|||]male": ["female", "male", "male", "male"] * 2 + ["female", "male"],
    # [from::when] removes, nested edits inside emphasis, more of A1111's doctests
    "a [b::3] c": ["a b c"] * 3 + ["a  c"] * 7,
    "a [b: 3]": ["a "] * 3 + ["a b"] * 7,
    "a [[[b]]:2]": ["a "] * 2 + ["a [[b]]"] * 8,
    "[(a:2):3]": [""] * 3 + ["(a:2)"] * 7,
    "((a][:b:c [d:3]": ["((a][:b:c "] * 3 + ["((a][:b:c d"] * 7,
    "[a|(b:1.1)]": ["a", "(b:1.1)"] * 5,
    "(a [b:c:2]:1.2)": ["(a b:1.2)"] * 2 + ["(a c:1.2)"] * 8,
    # numbers: with a "." a fraction, without one a step; capped at the run's steps
    "a [b:0] c": ["a b c"] * 10,
    "a [b:1.0]": ["a "] * 10,
    "a [b:1e1] c": ["a  c"] * 10,
    # malformed: literal text, as in A1111
    "[a:b:c]": ["[a:b:c]"] * 10,
    "x [a|b] | y": ["x [a|b] | y"] * 10,  # a "|" outside brackets: A1111's grammar fails on the whole prompt
    "a [b:3] \\": ["a [b:3] \\"] * 10,  # so does a backslash that escapes nothing
    "a \\[b:3]": ["a \\[b:3]"] * 10,  # an escaped bracket opens nothing
}


@pytest.mark.parametrize("prompt", list(TABLES))
def test_step_table_for_10_steps_is_a1111s(prompt):
    assert prompt_table(prompt, 10) == TABLES[prompt]
    assert has_schedule(prompt) == (len(set(TABLES[prompt])) > 1 or prompt in ("a [b:0] c", "a [b:1.0]", "a [b:1e1] c"))


def test_and_splits_into_weighted_subprompts_as_a1111():
    assert [(p.text, p.weight) for p in split_subprompts("a cat AND a dog :1.2")] == [("a cat", 1.0), (" a dog", 1.2)]
    assert [(p.text, p.weight) for p in split_subprompts("a castle :1.5")] == [("a castle", 1.5)]
    assert [(p.text, p.weight) for p in split_subprompts("ANDROID and more")] == [("ANDROID and more", 1.0)]


@pytest.mark.parametrize("prompt, steps", [("a [b:c:-1]", None), ("a [b:c:1.5]", None), ("a [b:c:30]", 20), ("a [b::-.5]", 10)])
def test_edit_step_out_of_range_is_refused_in_one_line(prompt, steps):
    with pytest.raises(ValueError, match=r"prompt edit step .* is out of range") as error:
        check_schedule(prompt, steps)
    assert "\n" not in str(error.value)


def test_step_numbers_are_checked_against_the_run_and_bad_input_is_refused_before_work():
    check_schedule("a [b:c:30]")  # no run yet: any step number may fit
    check_schedule("a [b:c:20]", 20)
    pipe = tiny_sd_pipeline()
    clip = load_conditioner("clip", pipe)
    with pytest.raises(ValueError, match="out of range"):
        clip.encode("a [b:c:-2]")
    with pytest.raises(ValueError, match="out of range"):
        clip.encode("a red cube", "[blurry:dark:2.5]")
    with pytest.raises(ValueError, match="prompt weight 300"):  # a bad weight in a variant shown only at late steps
        clip.encode("a [cube:(cube:300):0.9]")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"'30' .* of this 4-step run"):
        generate(pipe, clip, [PromptRequest("a [cat:dog:30]")], GenerationSettings(steps=4, height=32, width=32))
    assert calls == []


def unet_inputs_per_step(pipe, conditioner, conditioning, **call):
    """The (encoder_hidden_states, pooled) the UNet received in each call, after attach's hooks."""
    seen = []

    def spy(module, args, kwargs):
        pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        seen.append((kwargs["encoder_hidden_states"].clone(), None if pooled is None else pooled.clone()))

    with attach(pipe, conditioner):
        handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)  # after attach's: sees the mapped inputs
        try:
            pipe(**conditioning.kwargs(), output_type="np", **call)
        finally:
            handle.remove()
    return seen


def cfg_rows(conditioning):
    rows = torch.cat([conditioning.negative_prompt_embeds, conditioning.prompt_embeds])
    pooled = conditioning.pooled_prompt_embeds
    return rows, None if pooled is None else torch.cat([conditioning.negative_pooled_prompt_embeds, pooled])


PROMPT = "a [red|blue] cube [on:under:0.5] a [big ]ball[ at night::3]"
NEGATIVE = "[blurry|dark]"


@pytest.mark.parametrize("make_pipe", [tiny_sd_pipeline, tiny_sdxl_pipeline], ids=["sd", "sdxl"])
@pytest.mark.parametrize("name", ["clip", "long-clip"])
@torch.no_grad()
def test_unet_receives_the_static_encoding_of_each_steps_prompt(make_pipe, name):
    pipe = make_pipe()
    conditioner = load_conditioner(name, pipe)
    conditioning = conditioner.encode(PROMPT, NEGATIVE)
    assert conditioning.needs_attach and isinstance(conditioning.prompt_embeds, PipelineFeatures)
    seen = unet_inputs_per_step(pipe, conditioner, conditioning, num_inference_steps=6, height=32, width=32)
    prompts, negatives = prompt_table(PROMPT, 6), prompt_table(NEGATIVE, 6)
    assert len(seen) == 6 and len(set(prompts)) == 4 and len(set(negatives)) == 2
    for step, (hidden, pooled) in enumerate(seen):
        expected, expected_pooled = cfg_rows(conditioner.encode(prompts[step], negatives[step]))
        assert torch.equal(hidden, expected), step
        assert (pooled is None) == (expected_pooled is None)
        if pooled is not None:
            assert torch.equal(pooled, expected_pooled), step


@torch.no_grad()
def test_projected_conditioner_projects_each_steps_static_encoding():
    pipe = tiny_sd_pipeline()
    projected = load_conditioner("projected", pipe, projection="wiclp", switch_off_timestep=500)
    with torch.no_grad():  # a projection that is not the identity, so projecting shows
        projected.projection.conv.weight.normal_(std=0.05)
    seen = unet_inputs_per_step(pipe, projected, projected.encode(PROMPT, NEGATIVE), num_inference_steps=4, height=32, width=32)
    prompts, negatives = prompt_table(PROMPT, 4), prompt_table(NEGATIVE, 4)
    projected_steps = 0
    for step, ((hidden, _), t) in enumerate(zip(seen, pipe.scheduler.timesteps)):
        static = projected.embed(prompts[step], negatives[step])  # the marked static rows, mapped at t
        rows = torch.cat([static.negative_prompt_embeds, static.prompt_embeds])
        assert torch.equal(hidden, projected.at_timestep(rows, t)), step
        projected_steps += int(t > 500)
    assert 0 < projected_steps < 4


@torch.no_grad()
def test_a_prompt_without_the_syntax_stays_static_and_bit_exact():
    pipe = tiny_sdxl_pipeline()
    clip = load_conditioner("clip", pipe)
    for prompt in ("a red cube", "a (red:1.2) cube [on] a table", "a [red cube"):
        conditioning = clip.encode(prompt, "blurry")
        assert not conditioning.needs_attach and not isinstance(conditioning.prompt_embeds, PipelineFeatures)
        for name, tensor in clip.embed(prompt, "blurry").tensors().items():
            assert torch.equal(conditioning.tensors()[name], tensor), name


@torch.no_grad()
def test_img2img_counts_steps_from_the_first_executed_step_over_all_steps_as_a1111():
    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_components())
    pipe.set_progress_bar_config(disable=True)
    clip = load_conditioner("clip", pipe)
    prompt = "a [red|blue] cube [on:under:3] a table"
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    seen = unet_inputs_per_step(pipe, clip, clip.encode(prompt, "blurry"), num_inference_steps=10, strength=0.5, image=image)
    table = prompt_table(prompt, 10)
    assert len(seen) == 5
    for step, (hidden, _) in enumerate(seen):  # executed step k reads row k of the 10-step table
        expected, _ = cfg_rows(clip.encode(table[step], "blurry"))
        assert torch.equal(hidden, expected), step


def test_scheduled_prompts_keep_images_independent_of_batch_mates():
    pipe = tiny_sd_pipeline()
    clip = load_conditioner("clip", pipe)
    long_variant = "a [small|" + " ".join(["very"] * 40) + " large] cube"  # one chunk at odd steps, two at even ones
    requests = [PromptRequest("a [red|blue] cube", seed=1), PromptRequest(long_variant, "blurry", seed=2),
                PromptRequest("a [red|pink] cube", seed=3), PromptRequest("a green cube", seed=4)]
    settings = GenerationSettings(steps=2, height=32, width=32, batch_size=4)
    encoded = [clip.encode(r.prompt, r.negative_prompt) for r in requests]
    assert encoded[0].prompt_embeds.shape == encoded[2].prompt_embeds.shape
    assert batches_of_equal_shape(encoded, 4) == [[0], [1], [2], [3]]  # equal shapes, but different requests
    assert batches_of_equal_shape(encoded * 2, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    together = generate(pipe, clip, requests, settings)
    for request, result in zip(requests, together):
        alone = generate(pipe, clip, [request], settings)[0]
        assert np.array_equal(np.asarray(result.image), np.asarray(alone.image)), request.prompt[:20]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "prompt, named",
    [("a [cat:dog:30]", "'30'"), ("a [cat:dog:-1]", "'-1'"), ("a cat AND a dog:200", "200")],
)
def test_cli_refuses_a_bad_schedule_in_one_line_and_writes_nothing(prompt, named, model_dir, tmp_path, capsys):
    from condkit.cli import main

    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    code = main(["generate", "--model", str(model_dir), "--quiet", "--prompt", prompt, "--steps", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("condkit: error: ") and err.count("\n") == 1 and named in err, err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_features_carry_their_prompts_exactly_through_half_precision(dtype):
    from condkit.conditioning.scheduled_prompts import Request, read_rows

    clip = load_conditioner("clip", tiny_sdxl_pipeline())
    prompt, negative = "ünïcode \"quotes\" [a|b] c", "[blurry::0.3]\\(x\\)"
    features = clip.encode(prompt, negative, prompt_2="second [x|y]").prompt_embeds.to(dtype)
    assert read_rows(features) == [(1.0, Request(prompt, negative, "second [x|y]", None))]
