"""Every trainer leaves one unit in its run folder: conditioner/, a model card, the loss curve, validation grids,
and `condkit generate --conditioner RUN_DIR` uses it with no other flag."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

from condkit.cli import main
from condkit.training.data import folder_dataset
from condkit.training.long_clip_data import LongCaptionPairs, first_sentence
from condkit.training.loss_plot import append_loss_log, draw_loss_curve, smoothed
from condkit.training.model_card import RunSummary, model_card_text
from tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def captioned_folder(folder, count, captions=None, sizes=((40, 24), (24, 40))):
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        record = {"file_name": f"{i:02d}.png", "text": captions[i] if captions else f"a red square number {i}"}
        lines.append(json.dumps(record))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def generated(capsys, tmp_path, model_dir, name, *conditioner_flags, prompt="a red square"):
    out = tmp_path / name
    code, captured = run(capsys, "generate", "--model", model_dir, *conditioner_flags, "--prompt", prompt, "--steps", "2",
                         "--out", out, "--quiet")
    assert code == 0, captured.err
    return [np.asarray(Image.open(path)) for path in sorted(out.glob("0*.png"))]


def assert_run_folder(out, method_words, grid=False):
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: condkit")
    assert method_words in card and "## Command" in card and "condkit train" in card and "## Settings" in card
    assert "![loss curve](loss.png)" in card and Image.open(out / "loss.png").size == (640, 360)
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, len(log) + 1))
    assert (out / "conditioner" / "conditioner_config.json").is_file()
    if grid:
        assert "![validation grid](validation/step-" in card
    return card


def test_textual_inversion_run_is_one_unit_with_validation_grids(model_dir, tmp_path, capsys):
    images = captioned_folder(tmp_path / "images", 4, captions=["a photo of <red-thing>", "", "", ""])
    out = tmp_path / "run"
    code, captured = run(capsys, "train", "textual-inversion", "--model", model_dir, "--data", images, "--initializer", "red",
                         "--placeholder", "<red-thing>", "--max-train-steps", "2", "--train-batch-size", "2",
                         "--resolution", "32", "--random-crop", "--flip", "--bucketing", "--validation-prompt",
                         "a photo of <red-thing>", "--validation-prompt", "a <red-thing> on grass", "--validation-steps", "1",
                         "--out", out, "--quiet")
    assert code == 0, captured.err
    card = assert_run_folder(out, "TextualInversion of <red-thing>", grid=True)
    assert "--bucketing" in card and "aspect_ratio_bucketing | true" in card
    for step in ("step-000001", "step-000002"):
        assert sorted(p.name for p in (out / "validation" / step).iterdir()) == ["00.png", "01.png", "grid.png"]
    assert (out / "checkpoints").is_dir()
    # the unit gives exactly what the embedding file gives through --embedding
    by_unit = generated(capsys, tmp_path, model_dir, "unit", "--conditioner", out, prompt="a photo of <red-thing>")
    by_file = generated(capsys, tmp_path, model_dir, "file", "--embedding", out / "learned_embeds.safetensors",
                        prompt="a photo of <red-thing>")
    assert len(by_unit) == 1 and np.array_equal(by_unit[0], by_file[0])


def test_projection_adapter_on_own_data_is_one_unit(model_dir, tmp_path, capsys):
    data = captioned_folder(tmp_path / "data", 4)
    out = tmp_path / "run"
    code, captured = run(capsys, "train", "adapter", "--kind", "projection", "--model", model_dir, "--data", data,
                         "--steps", "2", "--batch-size", "2", "--learning-rate", "0.01", "--resolution", "32",
                         "--project-all-timesteps", "--flip", "--gradient-checkpointing", "--validation-prompt", "a red square",
                         "--out", out, "--quiet")
    assert code == 0, captured.err
    card = assert_run_folder(out, "projection adapter (wiclp)", grid=True)
    assert "4 images from folder" in card and "gradient_checkpointing | true" in card
    assert (out / "validation" / "step-000002" / "00.png").is_file()
    by_run = generated(capsys, tmp_path, model_dir, "by-run", "--conditioner", out)
    by_folder = generated(capsys, tmp_path, model_dir, "by-folder", "--conditioner", out / "conditioner")
    assert len(by_run) == 1 and np.array_equal(by_run[0], by_folder[0])
    weights = load_file(out / "conditioner" / "projection" / "diffusion_pytorch_model.safetensors")
    assert any(float(tensor.abs().max()) > 0 for tensor in weights.values())  # trained away from the zero start


def long_clip_for(model_dir, folder):
    """A CLIPModel whose text tower is the tiny pipeline's text encoder (so the unit fits it)."""
    pipe = tiny_sd_pipeline()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=16)
    text = pipe.text_encoder.config.to_dict()
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(folder)
    return folder


def test_long_clip_on_own_long_and_short_captions_is_one_unit(model_dir, tmp_path, capsys):
    captions = [f"A red square number {i}. It sits on a white ground near {i % 5} blue dots." for i in range(36)]
    data = captioned_folder(tmp_path / "data", 36, captions=captions)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    short = [json.dumps({**json.loads(line), "short": f"square {i}" if i % 2 else ""}) for i, line in enumerate(lines)]
    (data / "metadata.jsonl").write_text("\n".join(short) + "\n")
    clip = long_clip_for(model_dir, tmp_path / "clip")
    out = tmp_path / "run"
    code, captured = run(capsys, "train", "long-clip", "--clip", clip, "--tokenizer", model_dir / "tokenizer",
                         "--model", model_dir, "--data", data, "--short-caption-column", "short", "--steps", "1",
                         "--batch-size", "34", "--gradient-checkpointing", "--out", out, "--quiet")
    assert code == 0, captured.err
    card = assert_run_folder(out, "Long-CLIP text encoder")
    assert "short captions from column 'short'" in card
    assert (out / "conditioner" / "text_encoder" / "config.json").is_file()
    images = generated(capsys, tmp_path, model_dir, "long", "--conditioner", out, prompt=captions[0])
    assert len(images) == 1


def test_short_captions_default_to_the_first_sentence(tmp_path):
    assert first_sentence("A cat. On a mat.") == "A cat." and first_sentence("no stop here") == "no stop here"
    data = captioned_folder(tmp_path / "data", 2, captions=["One. Two.", "Three. Four."])
    pairs = LongCaptionPairs(folder_dataset(data), image_size=16)
    assert [pairs[i]["short_caption"] for i in range(2)] == ["One.", "Three."]
    assert pairs[0]["long_caption"] == "One. Two." and pairs[0]["image"].shape == (3, 16, 16)
    assert -1.0 <= float(pairs[0]["image"].min()) and float(pairs[0]["image"].max()) <= 1.0


def test_model_card_and_loss_curve(tmp_path):
    summary = RunSummary(method="X", base_model="org/model", data="4 images", steps=3, settings={"lr": 0.1},
                         command="condkit train x", usage="condkit generate --conditioner run", loss_curve="loss.png")
    text = model_card_text(summary)
    assert "base_model: org/model" in text and "| lr | 0.1 |" in text and "condkit train x" in text
    log = tmp_path / "loss_log.jsonl"
    assert append_loss_log(log, 0, [3.0, 2.0, 1.0]) == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert append_loss_log(log, 2, [0.5]) == [(1, 3.0), (2, 2.0), (3, 0.5)]  # a resume from step 2 replaces step 3
    picture = Image.open(draw_loss_curve(append_loss_log(log, 3, []), tmp_path / "loss.png")).convert("RGB")
    assert picture.size == (640, 360) and len(np.unique(np.asarray(picture).reshape(-1, 3), axis=0)) > 3
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no finite loss"):
        draw_loss_curve([(1, float("nan"))], tmp_path / "nan.png")


def test_core_run_is_one_unit(model_dir, tmp_path, capsys):
    images = captioned_folder(tmp_path / "images", 2, captions=["", ""])
    out = tmp_path / "run"
    code, captured = run(capsys, "train", "core", "--model", model_dir, "--data", images, "--initializer", "red",
                         "--placeholder", "<core-thing>", "--max-train-steps", "2", "--train-batch-size", "2",
                         "--resolution", "32", "--out", out, "--quiet")
    assert code == 0, captured.err
    assert_run_folder(out, "CoRe of <core-thing>")
    by_unit = generated(capsys, tmp_path, model_dir, "unit", "--conditioner", out, prompt="a <core-thing>")
    by_file = generated(capsys, tmp_path, model_dir, "file", "--embedding", out / "learned_embeds.safetensors",
                        prompt="a <core-thing>")
    assert np.array_equal(by_unit[0], by_file[0])
