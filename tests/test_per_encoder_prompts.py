"""Per-encoder prompts (diffusers' prompt_2 / negative_prompt_2, SD3's prompt_3 / negative_prompt_3): each encoder its own
text, exactly as diffusers' encode_prompt and pipeline call, through generate(), prompts files and `condkit generate`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from condkit import GenerationSettings, PromptRequest, generate, load_conditioner
from condkit.pipelines.prompts_file import read_prompts_file
from cli_helpers import run
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline


@torch.no_grad()
@pytest.mark.parametrize("negative, negative_2", [("blurry", "dark"), ("blurry", None), (None, None)])
def test_per_encoder_prompts_match_diffusers(negative, negative_2):
    pipe = tiny_sdxl_pipeline()
    prompts, prompts_2 = ["a red circle", "a blue square"], ["watercolor", "an oil painting"]
    ours = load_conditioner("clip", pipe).encode(prompts, negative, prompt_2=prompts_2, negative_prompt_2=negative_2)
    theirs = pipe.encode_prompt(prompt=prompts, prompt_2=prompts_2, negative_prompt=negative, negative_prompt_2=negative_2,
                                device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, reference in zip(names, theirs):
        assert torch.equal(getattr(ours, name), reference), name
    same = load_conditioner("clip", pipe).encode(prompts, negative)
    assert not torch.equal(ours.pooled_prompt_embeds, same.pooled_prompt_embeds)  # the second encoder read prompt_2


@torch.no_grad()
def test_projected_passes_them_on_and_one_encoder_refuses_them():
    pipe = tiny_sdxl_pipeline()
    projected = load_conditioner("projected", pipe, projection="wiclp")
    clip = load_conditioner("clip", pipe)
    marked = projected.encode("a red circle", prompt_2="watercolor").prompt_embeds.as_subclass(torch.Tensor)
    assert torch.equal(marked[:, :-1], clip.encode("a red circle", prompt_2="watercolor").prompt_embeds)
    with pytest.raises(ValueError, match="apply to two text encoders"):
        load_conditioner("clip", tiny_sd_pipeline()).encode("a red circle", prompt_2="watercolor")
    with pytest.raises(ValueError, match="got 3 prompt_2 values for 1 prompts"):
        clip.encode("a red circle", prompt_2=["a", "b", "c"])


# generate(), the prompts file and `condkit generate` carry the per-encoder prompts to the conditioner.

SETTINGS = dict(steps=2, guidance=5.0, seed=3, height=32, width=32, batch_size=2)
FAMILIES = {  # pipeline, conditioner options, call options, per-encoder prompts of the first request
    "sdxl": (tiny_sdxl_pipeline, {}, {}, {"prompt_2": "watercolor", "negative_prompt_2": "dark"}),
    "sd3": (tiny_sd3_pipeline, {"max_sequence_length": 16}, {"max_sequence_length": 16},
            {"prompt_2": "watercolor", "negative_prompt_2": "dark", "prompt_3": "an oil painting", "negative_prompt_3": "noisy"}),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 16}, {"max_sequence_length": 16, "true_cfg_scale": 2.0},
             {"prompt_2": "a blue cube", "negative_prompt_2": "dark"}),
}


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_draws_what_the_pipeline_draws_from_the_same_per_encoder_prompts(family):
    make_pipe, options, call_options, per_encoder = FAMILIES[family]
    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = "a red circle", "blurry"
    requests = [PromptRequest(prompt, negative, seed=3, **per_encoder), PromptRequest(prompt, negative, seed=3)]
    # one image per call on both sides: CPU kernels may round a batch of one differently from a batch of two
    settings = GenerationSettings(**{**SETTINGS, "batch_size": 1})
    ours = generate(pipe, load_conditioner("clip", pipe, **options), requests, settings, **call_options)
    for result, own in zip(ours, [per_encoder, {}], strict=True):
        theirs = pipe(prompt, negative_prompt=negative, **own, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                      generator=torch.Generator().manual_seed(3), **call_options).images[0]
        assert np.array_equal(np.asarray(result.image), np.asarray(theirs))
    assert not np.array_equal(np.asarray(ours[0].image), np.asarray(ours[1].image))  # same prompt and seed: the encoders read them
    assert ours[0].per_encoder_prompts() == per_encoder and ours[1].per_encoder_prompts() == {}


def test_an_image_does_not_depend_on_its_batch_mates_per_encoder_prompts():
    pipe = tiny_sd3_pipeline()
    conditioner = load_conditioner("clip", pipe, max_sequence_length=16)
    kept = PromptRequest("a red circle", prompt_2="watercolor", prompt_3="ink", seed=1)
    first = generate(pipe, conditioner, [PromptRequest("a red circle", prompt_2="chalk", seed=2), kept],
                     GenerationSettings(**SETTINGS), max_sequence_length=16)
    second = generate(pipe, conditioner, [PromptRequest("a red circle", prompt_3="felt", negative_prompt_2="dark", seed=2), kept],
                      GenerationSettings(**SETTINGS), max_sequence_length=16)
    assert np.array_equal(np.asarray(first[1].image), np.asarray(second[1].image))


def test_an_edit_step_beyond_the_run_in_prompt_2_is_refused_before_the_run():
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(ValueError, match=r"prompt edit step '30' in 'a \[red:blue:30\] circle' is out of range of this 2-step run"):
        generate(pipe, load_conditioner("clip", pipe), [PromptRequest("a circle", prompt_2="a [red:blue:30] circle")],
                 GenerationSettings(**SETTINGS))


@pytest.mark.parametrize(
    "make_pipe, per_encoder, message",
    [
        (tiny_sd_pipeline, {"prompt_2": "watercolor"},
         "prompt_2='watercolor' does not apply to CLIPConditioner on StableDiffusionPipeline; per-encoder prompts expected: "
         "none (it reads prompt and negative_prompt only)"),
        (tiny_sd_pipeline, {"negative_prompt_2": "dark"}, "negative_prompt_2='dark' does not apply to CLIPConditioner"),
        (tiny_sdxl_pipeline, {"prompt_3": "ink"},
         "prompt_3='ink' does not apply to CLIPConditioner on StableDiffusionXLPipeline; per-encoder prompts expected: "
         "only prompt_2, negative_prompt_2"),
        (tiny_flux_pipeline, {"negative_prompt_3": "dark"},
         "negative_prompt_3='dark' does not apply to FluxCLIPConditioner on FluxPipeline; per-encoder prompts expected: "
         "only prompt_2, negative_prompt_2"),
        (lambda: tiny_sd3_pipeline(with_t5=False), {"prompt_3": "ink"},
         "prompt_3='ink' does not apply to SD3CLIPConditioner on StableDiffusion3Pipeline; per-encoder prompts expected: "
         "only prompt_2, negative_prompt_2"),
    ],
    ids=["sd-prompt_2", "sd-negative_prompt_2", "sdxl-prompt_3", "flux-negative_prompt_3", "sd3-without-t5-prompt_3"],
)
def test_a_per_encoder_prompt_without_its_encoder_is_refused_before_anything_is_encoded(make_pipe, per_encoder, message, monkeypatch):
    pipe = make_pipe()
    conditioner = load_conditioner("clip", pipe)
    monkeypatch.setattr(conditioner, "encode", lambda *args, **kwargs: pytest.fail("encoded before the refusal"))
    requests = [PromptRequest("a red circle"), PromptRequest("a blue square", **per_encoder)]  # the second one is refused
    with pytest.raises(ValueError) as refusal:
        generate(pipe, conditioner, requests, GenerationSettings(**SETTINGS))
    assert message in str(refusal.value) and "\n" not in str(refusal.value)


def test_projected_refuses_what_its_wrapped_conditioner_refuses():
    sd = tiny_sd_pipeline()
    assert load_conditioner("projected", sd, projection="wiclp").per_encoder_prompt_names == ()
    assert load_conditioner("projected", tiny_sdxl_pipeline(), projection="wiclp").per_encoder_prompt_names == (
        "prompt_2", "negative_prompt_2")
    with pytest.raises(ValueError, match="prompt_2='x' does not apply to ProjectedConditioner on StableDiffusionPipeline"):
        generate(sd, load_conditioner("projected", sd, projection="wiclp"), [PromptRequest("a", prompt_2="x")])


def test_prompts_file_reads_the_per_encoder_prompts(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "prompt_2": "b", "negative_prompt_2": "c", "prompt_3": "d", "negative_prompt_3": "e"}\n'
                       '{"prompt": "f", "prompt_2": null}\n')
    assert read_prompts_file(prompts) == [
        PromptRequest("a", prompt_2="b", negative_prompt_2="c", prompt_3="d", negative_prompt_3="e"), PromptRequest("f")]
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "prompt_3": 3}\n')
    with pytest.raises(ValueError, match=r"^p.jsonl line 2: prompt_3 must be a string, got 3$"):
        read_prompts_file(prompts)
    prompts.write_text('{"prompt": "a", "prompt_4": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl line 1: unknown field\(s\) \['prompt_4'\]; expected .*'prompt_3'"):
        read_prompts_file(prompts)


# `condkit generate --prompt-2/--negative-2/--prompt-3/--negative-3`

SIZE = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--quiet", "--no-grid"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-encoder-models")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    return root


def test_cli_flags_and_jsonl_keys_give_each_prompt_its_per_encoder_prompts(folders, tmp_path, capsys):
    sd3 = ["--model", folders / "sd3", "--max-sequence-length", "16", "--seed", "4", *SIZE]
    code, _, err = run(capsys, "generate", *sd3, "--prompt", "a red circle", "--prompt", "a blue square",
                       "--prompt-2", "watercolor", "--prompt-2", "chalk", "--negative", "blurry", "--negative-2", "dark",
                       "--prompt-3", "ink", "--negative-3", "noisy", "--out", tmp_path / "flags")
    assert code == 0, err
    expected = [{"prompt": "a red circle", "prompt_2": "watercolor"}, {"prompt": "a blue square", "prompt_2": "chalk"}]
    for index, (seed, own) in enumerate(zip((4, 5), expected)):
        metadata = json.loads((tmp_path / "flags" / f"{index:05d}_{seed}.json").read_text())
        assert {name: metadata.get(name) for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_3",
                                                      "negative_prompt_3")} == {
            **own, "negative_prompt": "blurry", "negative_prompt_2": "dark", "prompt_3": "ink", "negative_prompt_3": "noisy"}

    lines = [{"prompt": "a red circle", "negative_prompt": "blurry", "prompt_2": "watercolor", "negative_prompt_2": "dark",
              "prompt_3": "ink", "negative_prompt_3": "noisy", "seed": 4}, {"prompt": "a red circle", "seed": 4}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = run(capsys, "generate", *sd3, "--prompts-file", tmp_path / "p.jsonl", "--out", tmp_path / "jsonl")
    assert code == 0, err
    from_flags, from_file, plain = (np.asarray(Image.open(path)) for path in (
        tmp_path / "flags" / "00000_4.png", tmp_path / "jsonl" / "00000_4.png", tmp_path / "jsonl" / "00001_4.png"))
    assert np.array_equal(from_flags, from_file) and not np.array_equal(from_file, plain)
    assert "prompt_2" not in json.loads((tmp_path / "jsonl" / "00001_4.json").read_text())  # unset: not in the metadata


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "a", "--prompt", "b", "--prompt-2", "x", "--prompt-2", "y", "--prompt-2", "z"],
         "got 3 --prompt-2 values for 2 prompts; expected 1 or 2"),
        (["--prompt", "a", "--prompt", "b", "--prompt", "c", "--negative-3", "x", "--negative-3", "y"],
         "got 2 --negative-3 values for 3 prompts; expected 1 or 3"),
        (["--prompts-file", "p.jsonl", "--prompt-2", "x"],
         "--prompt-2 cannot be combined with --prompts-file; put prompt_2 in the JSONL lines"),
        (["--prompts-file", "p.jsonl", "--negative-2", "x"],
         "--negative-2 cannot be combined with --prompts-file; put negative_prompt_2 in the JSONL lines"),
        (["--prompt", "a", "--prompt-", "x"], "unrecognized arguments: --prompt- x"),  # no abbreviations
        (["--prompt", "a", "--prompt-2", "watercolor"],
         "prompt_2='watercolor' does not apply to CLIPConditioner on StableDiffusionPipeline"),  # SD1.5: one text encoder
    ],
)
def test_cli_refuses_bad_per_encoder_prompts_in_one_line_with_status_2(folders, argv, message, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", folders / "sd", *argv, "--out", tmp_path / "never", *SIZE)
    assert code == 2
    assert err.startswith("condkit: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()
