"""`condkit train textual-inversion` end to end on tiny models, and its one-line errors."""

import json

import pytest
from PIL import Image

from condkit.cli import main
from condkit.conditioning.embedding_formats import detect_format, read_embedding
from tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (200, 30 * i, 20)).save(folder / f"{i}.png")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_textual_inversion_writes_a_diffusers_embedding(model_dir, images, tmp_path, capsys):
    config = tmp_path / "ti.json"
    config.write_text(json.dumps({"initializer": "red", "num_vectors": 2, "max_train_steps": 2, "learning_rate": 0.01}))
    out = tmp_path / "run"
    code, captured = run(capsys, "train", "textual-inversion", "--config", config, "--model", model_dir, "--images", images,
                         "--placeholder", "<red-thing>", "--train-batch-size", "2", "--resolution", "32", "--out", out, "--quiet")
    assert code == 0, captured.err
    embedding_file = out / "learned_embeds.safetensors"
    assert detect_format(embedding_file) == "diffusers"
    embedding = read_embedding(embedding_file)
    assert embedding.token == "<red-thing>" and embedding.vectors[0].shape == (2, 32)


@pytest.mark.parametrize("extra,message", [
    (["--placeholder", "a"], "placeholder token 'a' is already in the tokenizer's vocabulary"),
    (["--initializer", " "], "initializer word ' ' is unknown"),
])
def test_bad_tokens(model_dir, images, tmp_path, capsys, extra, message):
    argv = ["train", "textual-inversion", "--model", model_dir, "--images", images, "--initializer", "red",
            "--out", tmp_path / "run", "--max-train-steps", "1", "--quiet", *extra]
    code, captured = run(capsys, *argv)
    assert code == 2 and message in captured.err and captured.err.count("\n") == 1


def test_no_images_and_unreadable_image(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, captured = run(capsys, "train", "textual-inversion", "--model", model_dir, "--images", empty, "--initializer", "red")
    assert code == 2 and "no images found in" in captured.err
    (empty / "broken.png").write_bytes(b"not a png")
    code, captured = run(capsys, "train", "textual-inversion", "--model", model_dir, "--images", empty, "--initializer", "red")
    assert code == 2 and "cannot read image" in captured.err and "broken.png" in captured.err


def test_existing_output_is_not_overwritten(model_dir, images, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "learned_embeds.safetensors").write_bytes(b"precious")
    code, captured = run(capsys, "train", "textual-inversion", "--model", model_dir, "--images", images,
                         "--initializer", "red", "--out", out)
    assert code == 2 and "already exists" in captured.err
    assert (out / "learned_embeds.safetensors").read_bytes() == b"precious"


def test_config_file_with_unknown_key(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"learning_rat": 1}))
    code, captured = run(capsys, "train", "textual-inversion", "--config", config)
    assert code == 2 and "unknown option(s) ['learning_rat']" in captured.err


def test_convert_longclip_cli(tmp_path, capsys):
    import torch

    from test_long_clip_convert import official_checkpoint

    checkpoint = tmp_path / "longclip-tiny.pt"
    torch.save(official_checkpoint(width=64, layers=1, projection=32, visual=False), checkpoint)
    code, captured = run(capsys, "convert", "longclip", checkpoint, tmp_path / "hf")
    assert code == 0, captured.err
    assert (tmp_path / "hf" / "text_encoder" / "config.json").is_file()

    bad = tmp_path / "not-longclip.pt"
    torch.save({"token_embedding.weight": torch.zeros(3, 4)}, bad)
    code, captured = run(capsys, "convert", "longclip", bad, tmp_path / "hf2")
    assert code == 2 and captured.err.startswith("condkit: error: ") and captured.err.count("\n") == 1


def test_conditioner_options_reach_from_pipeline(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", "long-clip", "--opt", "pad_token=zero",
                         "--prompt", "a red circle", "--steps", "1", "--height", "32", "--width", "32",
                         "--out", tmp_path / "o", "--quiet")
    assert code == 0, captured.err
    code, captured = run(capsys, "generate", "--model", model_dir, "--opt", "no_such_option=1", "--prompt", "x",
                         "--out", tmp_path / "o2", "--quiet")
    assert code == 2 and "conditioner 'clip' has no option 'no_such_option'" in captured.err


def test_core_with_test_time_writes_both_embeddings(model_dir, images, tmp_path, capsys):
    out = tmp_path / "core"
    code, captured = run(capsys, "train", "core", "--model", model_dir, "--images", images, "--initializer", "red",
                         "--placeholder", "<c>", "--max-train-steps", "2", "--train-batch-size", "2", "--resolution", "32",
                         "--norm-window", "1", "2", "--test-time", "a photo of <c> on a table", "--test-time-steps", "2",
                         "--out", out, "--quiet")
    assert code == 0, captured.err
    assert read_embedding(out / "learned_embeds.safetensors").token == "<c>"
    assert read_embedding(out / "learned_embeds_test_time.safetensors").token == "<c>"
    assert "regularization loss" in captured.out


def test_core_test_time_prompt_must_hold_the_placeholder(model_dir, images, tmp_path, capsys):
    code, captured = run(capsys, "train", "core", "--model", model_dir, "--images", images, "--initializer", "red",
                         "--placeholder", "<c>", "--test-time", "a red circle", "--out", tmp_path / "c", "--quiet")
    assert code == 2 and "does not contain the placeholder '<c>'" in captured.err


def test_train_adapter_projection(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "train", "adapter", "--kind", "projection", "--model", model_dir, "--steps", "2",
                         "--batch-size", "2", "--dataset-size", "4", "--out", tmp_path / "proj", "--quiet")
    assert code == 0, captured.err
    assert "wrote" in captured.out

    out = tmp_path / "images"
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", tmp_path / "proj" / "conditioner",
                         "--prompt", "a red circle", "--steps", "2", "--out", out, "--quiet")
    assert code == 0, captured.err
    metadata = json.loads(next(out.glob("*.json")).read_text())
    assert metadata["conditioner"] == str(tmp_path / "proj" / "conditioner")


def test_generate_with_a_folder_that_is_not_a_conditioner(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", tmp_path, "--prompt", "a red circle",
                         "--out", tmp_path / "images", "--quiet")
    assert code == 2 and "is not a saved conditioner (no conditioner_config.json)" in captured.err
    assert captured.err.count("\n") == 1 and not (tmp_path / "images").exists()


def test_adapter_flag_names_its_replacement(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "generate", "--adapter", tmp_path, "--prompt", "x", "--out", tmp_path / "images", "--quiet")
    assert code == 2 and f"--adapter was replaced by --conditioner DIR: use --conditioner {tmp_path}" in captured.err
    assert not (tmp_path / "images").exists()


def test_train_adapter_unknown_kind(capsys):
    code, captured = run(capsys, "train", "adapter", "--kind", "nope")
    assert code == 2 and "argument --kind: invalid choice: 'nope'" in captured.err and captured.err.count("\n") == 1


def test_long_clip_training_checkpoints_and_resumes(tmp_path, capsys):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    from condkit.shapes_world import MODEL_DIR

    tokenizer = CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, eos_token_id=tokenizer.eos_token_id, projection_dim=16)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=16)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(tmp_path / "clip")
    out = tmp_path / "run"
    argv = ["train", "long-clip", "--clip", tmp_path / "clip", "--pairs", "36", "--batch-size", "34",
            "--checkpointing-steps", "1", "--out", out, "--quiet"]
    code, captured = run(capsys, *argv, "--steps", "1")
    assert code == 0, captured.err
    assert (out / "text_encoder" / "config.json").is_file() and (out / "checkpoints" / "step-000001").is_dir()
    code, captured = run(capsys, *argv, "--steps", "2")
    assert code == 2 and "already holds a Long-CLIP run; use another --out or --resume" in captured.err and captured.err.count("\n") == 1
    code, captured = run(capsys, *argv, "--steps", "2", "--resume")
    assert code == 0, captured.err
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_every_listed_conditioner_generates_or_names_what_it_needs(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "generate", "--list-conditioners")
    names = captured.out.split()
    assert {"clip", "long-clip", "projected", "llm-adapter", "concat"} <= set(names)
    for name in names:
        out = tmp_path / name
        code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", name, "--prompt", "a red circle",
                             "--steps", "1", "--out", out, "--quiet")
        if code == 0:
            assert len(list(out.glob("*.png"))) == 1, name
        else:  # refused before the pipeline loads: no loading bars, just the line
            assert code == 2 and captured.err.count("\n") == 1 and "--opt " in captured.err, (name, captured.err)
            assert captured.err.startswith("condkit: error: conditioner ") and not out.exists()


def test_a_saved_conditioner_from_python_runs_from_the_cli(model_dir, tmp_path, capsys):
    from condkit import load_conditioner, load_pipeline

    pipe = load_pipeline(model_dir, "cpu")
    load_conditioner("projected", pipe, projection="wiclp", switch_off_timestep=700).save_pretrained(tmp_path / "unit")
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", tmp_path / "unit", "--opt",
                         "switch_off_timestep=600", "--prompt", "a red circle", "--steps", "1", "--out", tmp_path / "o", "--quiet")
    assert code == 0, captured.err
    code, captured = run(capsys, "generate", "--conditioner", tmp_path / "unit", "--prompt", "a red circle",
                         "--steps", "1", "--out", tmp_path / "o2", "--quiet")  # the embedded model: another base width
    assert code == 2 and "saved for another base model or pipeline family" in captured.err and captured.err.count("\n") == 1
    assert not (tmp_path / "o2").exists()


def test_quiet_keeps_the_warning_that_a_prompt_was_truncated(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "generate", "--model", model_dir, "--opt", "max_chunks=1", "--prompt", "a red circle " * 30,
                         "--steps", "1", "--out", tmp_path / "o", "--quiet")
    assert code == 0, captured.err
    assert "prompt truncated to 1 chunk(s) of 77 tokens: dropped" in captured.err
    assert "it/s" not in captured.err and "step/s" not in captured.err  # no progress bars


def test_trainers_read_your_own_data(model_dir, tmp_path, capsys):
    code, captured = run(capsys, "world", "export", tmp_path / "data", "--count", "6", "--resolution", "32", "--quiet")
    assert code == 0, captured.err
    code, captured = run(capsys, "train", "adapter", "--kind", "projection", "--model", model_dir, "--data", tmp_path / "data",
                         "--steps", "2", "--batch-size", "2", "--out", tmp_path / "run", "--quiet")
    assert code == 0, captured.err
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", tmp_path / "run" / "conditioner",
                         "--prompt", "a red circle", "--steps", "1", "--out", tmp_path / "images", "--quiet")
    assert code == 0, captured.err

    concept = tmp_path / "concept"
    concept.mkdir()
    for index in range(2):
        Image.new("RGB", (32, 32), (200, 20, 20)).save(concept / f"{index}.png")
        (concept / f"{index}.txt").write_text("a photo of <c> on a table")
    code, captured = run(capsys, "train", "textual-inversion", "--model", model_dir, "--data", concept, "--initializer", "red",
                         "--placeholder", "<c>", "--max-train-steps", "1", "--train-batch-size", "2", "--out", tmp_path / "ti",
                         "--quiet")
    assert code == 0, captured.err and (tmp_path / "ti" / "learned_embeds.safetensors").is_file()


ADAPTER = ["train", "adapter", "--kind", "projection", "--steps", "1"]
TEXTUAL_INVERSION = ["train", "textual-inversion", "--initializer", "red"]


@pytest.mark.parametrize("argv, message", [
    ([*ADAPTER, "--data", "EMPTY"], "no images"),
    ([*ADAPTER, "--dataset", "DATA", "--caption-column", "caption"], "its columns are: image, text, style"),
    ([*ADAPTER, "--dataset", "DATA", "--streaming"], "max-items"),
    ([*TEXTUAL_INVERSION, "--images", "EMPTY", "--data", "EMPTY"], "--images and --data name the same thing"),
    ([*TEXTUAL_INVERSION, "--data", "EMPTY"], "no images"),
])  # fmt: skip
def test_bad_training_data_is_one_line(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    run(capsys, "world", "export", tmp_path / "data", "--count", "2", "--resolution", "32", "--quiet")
    argv = [str(tmp_path / "empty") if a == "EMPTY" else str(tmp_path / "data") if a == "DATA" else a for a in argv]
    code, captured = run(capsys, *argv, "--model", model_dir, "--out", tmp_path / "run", "--quiet")
    assert code == 2 and message in captured.err and captured.err.count("\n") == 1, captured.err
    assert not (tmp_path / "run").exists()


def test_emphasis_mode_from_the_cli(model_dir, tmp_path, capsys):
    prompt = ["--prompt", "a (red:1000) circle", "--steps", "1", "--quiet"]
    code, captured = run(capsys, "generate", "--model", model_dir, *prompt, "--out", tmp_path / "a")
    assert code == 2 and "1000" in captured.err  # a weight past ±100 is refused when brackets are syntax
    code, captured = run(capsys, "generate", "--model", model_dir, *prompt, "--emphasis", "none", "--out", tmp_path / "b")
    assert code == 0, captured.err  # ...and is plain text with --emphasis none
    metadata = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert metadata["conditioner"] == "clip" and metadata["conditioner_options"] == {"emphasis": "none"}
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", "llm-adapter", "--opt", "connector=new",
                         "--emphasis", "none", "--prompt", "x", "--out", tmp_path / "c", "--quiet")
    assert code == 2 and "has no option" in captured.err and "emphasis" in captured.err


@pytest.mark.parametrize("name, needs", [("projected", "projection="), ("llm-adapter", "connector="), ("concat", "first=")])
def test_a_missing_required_option_is_named_before_the_model_loads(model_dir, tmp_path, capsys, name, needs):
    code, captured = run(capsys, "generate", "--model", model_dir, "--conditioner", name, "--prompt", "x", "--out", tmp_path / "o")
    assert code == 2 and captured.err.count("\n") == 1 and f"--opt {needs}" in captured.err  # no loading bars before it
    assert not (tmp_path / "o").exists()
