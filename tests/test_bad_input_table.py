"""Every bad input, for every command: exit 2, one `condkit: error:` line naming the value, no new files.

Argument values are checked by argparse types before anything loads, so the table of flag × bad
value is cheap; the file and model cases below it load what they must and still write nothing.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from condkit.cli import main
from tiny_models import tiny_sd_pipeline

POSITIVE_INT = ["0", "-1", "abc", "1.5", "nan", ""]
NON_NEGATIVE_INT = ["-1", "abc", "2.5", "inf"]
SEED = ["-1", str(2**64), "abc", "1.5", "1e3"]
FINITE = ["nan", "inf", "-inf", "abc", "1,5"]
POSITIVE_FLOAT = ["0", "-1", "nan", "inf", "abc"]
NON_NEGATIVE_FLOAT = ["-1", "nan", "inf", "abc"]
MULTIPLE_OF_8 = ["0", "30", "-8", "abc", "63"]
TIMESTEP = ["-1", "1000", "abc", "500.5"]
STRENGTH = ["0", "-0.5", "1.01", "nan", "inf", "abc"]  # (0, 1]

SAMPLING = {"--seed": SEED, "--steps": POSITIVE_INT, "--guidance": FINITE, "--batch-size": POSITIVE_INT,
            "--height": MULTIPLE_OF_8, "--width": MULTIPLE_OF_8, "--clip-skip": NON_NEGATIVE_INT}
TEXTUAL_INVERSION = {"--max-train-steps": POSITIVE_INT, "--train-batch-size": POSITIVE_INT,
                     "--gradient-accumulation-steps": POSITIVE_INT, "--learning-rate": POSITIVE_FLOAT,
                     "--resolution": MULTIPLE_OF_8, "--checkpointing-steps": POSITIVE_INT, "--seed": SEED,
                     "--num-vectors": POSITIVE_INT}
COMMANDS = {
    ("generate", "--prompt", "x", "--init-image", "i.png"): {**SAMPLING, "--num-images": POSITIVE_INT, "--strength": STRENGTH},
    ("eval",): {**SAMPLING, "-n": POSITIVE_INT, "--limit": POSITIVE_INT},
    ("world", "train"): {"--seed": SEED},
    ("train", "textual-inversion"): TEXTUAL_INVERSION,
    ("train", "core"): {**TEXTUAL_INVERSION, "--lambda-embedding": NON_NEGATIVE_FLOAT, "--lambda-attention": NON_NEGATIVE_FLOAT,
                        "--test-time-steps": POSITIVE_INT, "--test-time-lr": POSITIVE_FLOAT},
    ("train", "long-clip"): {"--pairs": POSITIVE_INT, "--steps": POSITIVE_INT, "--batch-size": POSITIVE_INT,
                             "--learning-rate": POSITIVE_FLOAT, "--seed": SEED, "--checkpointing-steps": POSITIVE_INT},
    ("train", "adapter", "--kind", "projection"): {"--switch-off-timestep": TIMESTEP, "--steps": POSITIVE_INT,
                                                   "--batch-size": POSITIVE_INT, "--learning-rate": POSITIVE_FLOAT,
                                                   "--dataset-size": POSITIVE_INT, "--seed": SEED,
                                                   "--resolution": MULTIPLE_OF_8, "--gradient-accumulation-steps": POSITIVE_INT,
                                                   "--validation-steps": POSITIVE_INT},
    ("convert", "longclip", "in.pt", "out"): {"--keep": POSITIVE_INT, "--num-heads": POSITIVE_INT},
}
def flag_with(flag: str, value: str) -> list[str]:
    """`--flag=value` (a value such as "-inf" would otherwise read as an option), `-n VALUE` for short flags."""
    return [f"{flag}={value}"] if flag.startswith("--") else [f"{flag}{value}"] if value.startswith("-") else [flag, value]


ARGUMENT_CASES = [
    pytest.param([*command, *flag_with(flag, value)], value, id=f"{' '.join(command[:2])} {flag} {value!r}")
    for command, flags in COMMANDS.items()
    for flag, values in flags.items()
    for value in values
]
CHOICE_CASES = [
    (["train", "adapter", "--kind", "lora"], "lora"),
    (["train", "adapter", "--kind", "projection", "--projection", "mlp"], "mlp"),
    (["train", "textual-inversion", "--templates", "faces"], "faces"),
    (["world", "train", "--scale", "huge"], "huge"),
    (["generate", "--data", "x"], "--data"),  # no abbreviation of --dtype or anything else
    (["generate", "--prompt", "x", "--prompt-file", "p.txt"], "--prompt-file"),
    (["train", "adapter", "--kind", "projection", "--data", "5"], "'5'"),  # a folder, never --dataset-size 5
    (["train", "adapter", "--kind", "projection", "--dataset-siz", "5"], "--dataset-siz"),
    (["train", "adapter", "--kind", "projection", "--mixed-precision", "fp8"], "fp8"),
    (["train", "long-clip", "--mixed-precision", "fp8"], "fp8"),
    (["nope"], "nope"),
    (["train"], "METHOD"),
    (["generate", "--prompt"], "--prompt"),
    (["generate", "--prompt", "x", "--prompts-file", "p.txt"], "--prompts-file"),
]


def run(capsys, folder, argv) -> tuple[int, str]:
    before = sorted(path.relative_to(folder) for path in folder.rglob("*"))
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    after = sorted(path.relative_to(folder) for path in folder.rglob("*"))
    assert after == before, f"files written: {set(after) - set(before)}"
    return code, err


def assert_one_line_naming(code: int, err: str, value: str) -> None:
    assert code == 2, err
    assert err.startswith("condkit: error: ") and err.count("\n") == 1, err
    assert value in err, err


@pytest.mark.parametrize("argv, value", ARGUMENT_CASES + CHOICE_CASES)
def test_bad_argument(argv, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, tmp_path, argv)
    assert_one_line_naming(code, err, value)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def write(folder, name: str, content: bytes | str) -> str:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def file_cases(folder, model_dir) -> list[tuple[list[str], str]]:
    """(argv, text the error must contain); files are made in `folder`, which the test then snapshots."""
    images = folder / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "red").save(images / "a.png")
    truncated = write(folder, "truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    text = write(folder, "notes.txt", "hello")
    config_list = write(folder, "list.json", "[1, 2]")
    config_bad_value = write(folder, "bad.json", json.dumps({"learning_rate": -1}))
    config_unknown = write(folder, "unknown.json", json.dumps({"learning_rat": 1}))
    config_not_json = write(folder, "broken.json", "{")
    prompts_bad = write(folder, "bad.jsonl", '{"prompt": "ok", "seed": -3}\n')
    prompts_surrogate = write(folder, "surrogate.jsonl", '{"prompt": "a \\ud800 cat"}\n')
    set_without_spec = write(folder, "set.jsonl", '{"prompt": "a red circle"}\n')
    earlier = folder / "earlier"
    earlier.mkdir()
    (earlier / "00000_0.png").write_bytes(b"")
    model = ["--model", str(model_dir), "--quiet"]  # no loading bars: stderr is the error line alone
    out = ["--out", str(folder / "never")]
    ti = ["train", "textual-inversion", *model, "--images", str(images), "--initializer", "red", "--train-batch-size", "1", *out]
    adapter = ["train", "adapter", "--kind", "projection", *model, *out]
    empty = folder / "empty"
    empty.mkdir()
    broken = folder / "broken"
    broken.mkdir()
    Image.new("RGB", (32, 32), "red").save(broken / "fine.png")
    write(broken, "fine.txt", "a red square")
    write(broken, "bad.png", b"not a png")
    write(broken, "bad.txt", "a broken square")
    listed = folder / "listed"
    listed.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), "red").save(listed / name)
    write(listed, "metadata.jsonl", '{"file_name": "a.png", "text": "red"}\n{"file_name": "b.png", "prompt": "red"}\n')
    return [
        (["generate", *model, "--prompt", "x", "--embedding", truncated, *out], "truncated.safetensors"),
        (["generate", *model, "--prompt", "x", "--embedding", text, *out], "notes.txt"),
        (["generate", *model, "--prompt", "x", "--embedding", str(folder / "missing.pt"), *out], "missing.pt"),
        (["generate", *model, "--prompt", "x", "--conditioner", str(images), *out], "is not a saved conditioner"),
        (["generate", *model, "--prompt", "x", "--opt", "no-equals", *out], "no-equals"),
        (["generate", *model, "--prompt", "x", "--opt", "nope=1", *out], "nope"),
        (["generate", *model, "--prompt", "x", "--out", text], "notes.txt"),
        (["generate", *model, "--prompt", "x", "--out", str(earlier)], "--overwrite"),
        (["generate", *model, "--prompts-file", prompts_bad, *out], "-3"),
        (["generate", *model, "--prompts-file", prompts_surrogate, *out], "U+D800"),
        (["generate", *model, "--prompt", "a \ud800 cat", *out], "U+D800"),
        (["generate", *model, "--prompt", "(red:99999)", *out], "99999"),
        (["generate", *model, "--prompt", "((((red:100))))", *out], "red"),
        (["generate", *model, "--prompt", "(" * 20000 + "red", *out], "nest"),
        (["generate", "--model", str(images), "--prompt", "x", *out], "model_index.json"),
        (["generate", *model, "--prompt", "x", "--clip-skip", "99", *out], "99"),
        (["generate", *model, "--prompt", "x", "--lora", str(folder / "missing.safetensors"), *out], "missing.safetensors"),
        (["generate", *model, "--prompt", "x", "--lora", truncated, *out], "truncated.safetensors"),
        (["eval", *model, "--lora", text, *out], "notes.txt"),
        (["generate", *model, "--prompt", "x", "--init-image", str(folder / "missing.png"), *out], "missing.png"),
        (["generate", *model, "--prompt", "x", "--init-image", text, *out], "notes.txt"),
        (["generate", *model, "--prompt", "x", "--init-image", str(images / "a.png"), "--mask", text, *out], "notes.txt"),
        (["generate", *model, "--prompt", "x", "--controlnet", str(images), "--control-image", text, *out], "notes.txt"),
        (["generate", *model, "--prompt", "x", "--controlnet", str(images), "--control-image", str(images / "a.png"), *out],
         "not a ControlNet folder"),
        (["generate", *model, "--prompt", "x", "--offload", "sequential", "--device", "cpu", *out], "--offload sequential"),
        (["generate", "--model", str(folder / "model.ckpt"), "--prompt", "x", *out], "model.ckpt"),
        (["generate", *model, "--prompt", "x", "--conditioner", "projected", *out], "--opt projection="),
        (["generate", *model, "--prompt", "x", "--conditioner", "llm-adapter", *out], "--opt connector="),
        (["eval", *model, "--prompt-set", "nope", *out], "nope"),
        (["eval", *model, "--prompt-set", set_without_spec, *out], "spec"),
        ([*ti, "--placeholder", ""], "placeholder ''"),
        ([*ti, "--placeholder", "<c>", "--max-sequence-length", "8"], "applies to SD3 and Flux pipelines"),
        ([*ti, "--placeholder", "a"], "'a'"),  # the byte-level test tokenizer knows single characters
        ([*ti, "--placeholder", "<two words>"], "<two words>"),
        ([*ti, "--train-batch-size", "4"], "the dataset has 1 images"),
        ([*ti, "--save-format", "bogus"], "bogus"),
        ([*ti, "--save-format", "diffusers_sdxl"], "diffusers_sdxl"),
        ([*ti, "--config", config_list], "list.json"),
        ([*ti, "--config", config_bad_value], "learning_rate"),
        ([*ti, "--config", config_unknown], "learning_rat"),
        ([*ti, "--config", config_not_json], "broken.json"),
        (["train", "textual-inversion", *model, "--images", str(images), "--initializer", "red", "--out", text], "notes.txt"),
        ([*ti, "--initializer", "  "], "initializer word '  '"),
        (["train", "textual-inversion", *model, "--images", str(folder / "none"), "--initializer", "red", *out], "none"),
        (["train", "core", *model, "--images", str(images), "--initializer", "red", "--test-time", "no placeholder", *out],
         "no placeholder"),
        (["train", "long-clip", "--clip", str(folder / "none"), *out], "none"),
        ([*adapter, "--data", str(empty)], "no images found in"),
        ([*adapter, "--data", str(images)], "a.png' has no caption"),
        ([*adapter, "--data", str(listed)], "line 2 has no 'text'"),
        ([*adapter, "--data", str(listed), "--caption-column", "caption"], "its columns are: file_name, prompt, text"),
        ([*adapter, "--data", str(broken)], "bad.png"),
        ([*adapter, "--dataset", "./no-such-dataset"], "dataset folder './no-such-dataset' does not exist"),
        ([*adapter, "--dataset", text], "is a file"),
        ([*adapter, "--report-to", "tensorboard"], "needs the tensorboard package"),
        ([*adapter, "--report-to", "tensorbored"], "tensorbored"),
        ([*adapter, "--use-8bit-adam"], "bitsandbytes"),
        ([*adapter, "--push-to-hub", "me/run"], "HF_HUB_OFFLINE"),
        ([*adapter, "--push-to-hub", "not a repo"], "'not a repo'"),
        ([*adapter, "--validation-steps", "5"], "--validation-prompt"),
        ([*ti, "--report-to", "tensorboard"], "tensorboard"),
        ([*ti, "--use-8bit-adam"], "bitsandbytes"),
        (["train", "long-clip", "--short-caption-column", "short", *out], "--short-caption-column"),
        (["train", "long-clip", "--data", str(listed), "--caption-column", "text", "--short-caption-column", "short", *out],
         "column 'short' is not in"),
        (["convert", "longclip", text, str(folder / "converted")], "notes.txt"),
        (["convert", "longclip", str(folder / "missing.pt"), str(folder / "converted")], "missing.pt"),
        (["convert", "longclip", text, str(earlier)], "earlier"),
    ]


def test_bad_files_and_values_that_need_loading(capsys, tmp_path, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    failures = []
    for argv, value in file_cases(tmp_path, model_dir):
        try:
            code, err = run(capsys, tmp_path, argv)
            assert_one_line_naming(code, err, value)
        except AssertionError as error:
            failures.append(f"{argv[:3]}…{value!r}: {str(error).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def test_the_table_is_large():
    assert len(ARGUMENT_CASES) + len(CHOICE_CASES) >= 250
