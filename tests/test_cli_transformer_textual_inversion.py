"""`condkit train textual-inversion` on SD3 and Flux folders: the same vectors as the Python API
(TextualInversion on load_conditioner("clip", pipe), the loop with the transformer), written in the family's
single-file layout and as the run's clip-embeddings unit (RUN/conditioner); `condkit generate --conditioner RUN`
draws exactly what `--embedding TOKEN=FILE` draws, and both what the Python API draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from condkit import load_conditioner, load_embedding
from condkit.cli import main
from condkit.conditioning.embedding_formats import detect_format, read_embedding
from condkit.embedded import load_pipeline
from condkit.pipelines.generate import GenerationSettings, PromptRequest, generate
from condkit.training.data import load_training_data
from condkit.training.loop import TrainingConfig, train
from condkit.training.textual_inversion import TextualInversion
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline

TRAINING = ["--initializer", "red", "--placeholder", "<c>", "--num-vectors", "2", "--max-train-steps", "2",
            "--train-batch-size", "2", "--learning-rate", "0.01", "--resolution", "32", "--seed", "3", "--quiet"]
FILE_KEYS = {"sd3": {"clip_l", "clip_g", "t5xxl"}, "flux": {"clip_l", "t5xxl"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("red-squares")
    for index, shade in enumerate((200, 180, 220, 160)):
        Image.new("RGB", (32, 32), (shade, 20, 20)).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "pipeline"
    (tiny_sd3_pipeline() if request.param == "sd3" else tiny_flux_pipeline()).save_pretrained(folder)
    return request.param, folder


def python_api_vectors(folder, data, out, **conditioner_options) -> list[torch.Tensor]:
    """What the CLI flags above mean, through the Python API."""
    pipe = load_pipeline(str(folder), "cpu", "float32")
    conditioner = load_conditioner("clip", pipe, **conditioner_options)
    method = TextualInversion(conditioner, "<c>", "red", num_vectors=2, seed=3)
    config = TrainingConfig(output_dir=out, max_train_steps=2, train_batch_size=2, learning_rate=0.01, resolution=32,
                            seed=3, checkpointing_steps=100, mixed_precision="auto", show_progress=False)
    train(method, pipe.transformer, pipe.vae, pipe.scheduler, load_training_data(str(data), None, caption_required=False),
          config, conditioner=conditioner)
    return method.learned_vectors()


def test_cli_textual_inversion_equals_the_python_api_and_generates_with_the_run_or_the_file(model, data, tmp_path, capsys):
    family, folder = model
    run = tmp_path / "run"
    code = main(["train", "textual-inversion", "--model", str(folder), "--data", str(data), "--out", str(run), *TRAINING,
                 "--validation-prompt", "a photo of <c>"])  # rendered through the pipeline; never changes the training
    assert code == 0, capsys.readouterr().err
    assert (run / "validation" / "step-000002" / "00.png").is_file()
    learned = run / "learned_embeds.safetensors"
    assert detect_format(learned) == f"{family}_single_file"
    assert set(load_file(learned)) == FILE_KEYS[family]  # the keys ComfyUI's loader reads
    assert (run / "README.md").is_file() and (run / "loss_log.jsonl").is_file()
    assert (run / "conditioner" / "conditioner_config.json").is_file()
    assert f"condkit generate --model {folder} --conditioner {run}" in (run / "README.md").read_text()  # the model it needs

    from_cli = read_embedding(learned, "<c>").vectors
    from_python = python_api_vectors(folder, data, tmp_path / "python-run")
    assert len(from_cli) == len(FILE_KEYS[family])
    for cli_vectors, python_vectors in zip(from_cli, from_python, strict=True):
        assert cli_vectors.shape[0] == 2 and torch.equal(cli_vectors, python_vectors)

    drawn = {}
    for way, flags in (("embedding", ["--embedding", f"<c>={learned}"]), ("conditioner", ["--conditioner", str(run)])):
        out = tmp_path / f"images-{way}"
        code = main(["generate", "--model", str(folder), *flags, "--prompt", "a photo of <c>", "--steps", "2",
                     "--guidance", "3.5", "--height", "32", "--width", "32", "--seed", "5", "--quiet", "--no-grid",
                     "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        drawn[way] = np.asarray(Image.open(out / "00000_5.png"))
    assert np.array_equal(drawn["conditioner"], drawn["embedding"])

    pipe = load_pipeline(str(folder), "cpu", "float32")
    load_embedding(pipe, str(learned), token="<c>")
    (expected,) = generate(pipe, load_conditioner("clip", pipe), [PromptRequest("a photo of <c>")],
                           GenerationSettings(steps=2, guidance=3.5, seed=5, height=32, width=32))
    assert np.array_equal(drawn["embedding"], np.asarray(expected.image))


def test_max_sequence_length_trains_as_the_python_api_and_is_recorded_in_the_unit(model, data, tmp_path, capsys):
    family, folder = model
    run = tmp_path / "run"
    code = main(["train", "textual-inversion", "--model", str(folder), "--data", str(data), "--out", str(run), *TRAINING,
                 "--max-sequence-length", "8"])
    assert code == 0, capsys.readouterr().err
    from_cli = read_embedding(run / "learned_embeds.safetensors", "<c>").vectors
    from_python = python_api_vectors(folder, data, tmp_path / "python-run", max_sequence_length=8)
    assert all(torch.equal(a, b) for a, b in zip(from_cli, from_python, strict=True))
    pipe = load_pipeline(str(folder), "cpu", "float32")
    assert load_conditioner(str(run), pipe).config["max_sequence_length"] == 8


def test_bad_transformer_training_input_is_one_line(model, data, tmp_path, capsys):
    family, folder = model
    other = "flux_single_file" if family == "sd3" else "sd3_single_file"
    cases = [
        (["textual-inversion", "--save-format", other], f"--save-format {other!r} does not fit this model"),
        (["textual-inversion", "--save-format", "diffusers"], f"its tokens are written as '{family}_single_file'"),
        (["core"], "condkit train core runs on StableDiffusion(XL) models"),
        (["textual-inversion", "--max-sequence-length", "600"], "--max-sequence-length must be from 2 to 512"),
    ]
    for (command, *extra), message in cases:
        out = tmp_path / command
        code = main(["train", command, "--model", str(folder), "--data", str(data), "--out", str(out), *TRAINING, *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("condkit: error: ") and err.count("\n") == 1 and message in err, err
        assert not (out / "learned_embeds.safetensors").exists()
