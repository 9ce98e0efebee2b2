"""`condkit generate` end to end on a tiny pipeline folder, and its one-line errors."""

import json

import pytest

from cli_helpers import run
from tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_generate_writes_images_metadata_and_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(
        capsys, "generate", "--model", str(model_dir), "--prompt", "a (red:1.2) circle", "--prompt", "a blue square",
        "--negative", "blurry", "--steps", "2", "--seed", "5", "--height", "32", "--width", "32", "--out", str(out), "--quiet",
    )
    assert code == 0 and stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["00000_5.json", "00000_5.png", "00001_6.json", "00001_6.png", "grid.png"]
    metadata = json.loads((out / "00001_6.json").read_text())
    assert metadata["prompt"] == "a blue square" and metadata["negative_prompt"] == "blurry"
    assert metadata["model"] == str(model_dir) and metadata["conditioner"] == "clip" and metadata["steps"] == 2


def test_prompts_file_jsonl(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seed": 42}\n\n{"prompt": "a blue square", "negative_prompt": "x"}\n')
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--prompts-file", str(prompts), "--steps", "1",
                       "--height", "32", "--width", "32", "--out", str(tmp_path / "o"), "--quiet", "--no-grid")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "00000_42.json").read_text())["seed"] == 42


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--conditioner", "nope", "--prompt", "x"], "unknown conditioner 'nope'; expected one of"),
        (["--model", "/no/such/folder", "--prompt", "x"], "model folder '/no/such/folder' does not exist"),
        (["--model", "nobody-here/no-such-model", "--prompt", "x"], "could not load hub model 'nobody-here/no-such-model'"),
        (["--prompts-file", "/no/prompts.txt"], "prompts file '/no/prompts.txt' does not exist"),
        (["--prompt", "a", "--prompt", "b", "--negative", "x", "--negative", "y", "--negative", "z"], "got 3 --negative values for 2 prompts"),
        (["--prompt", "x", "--steps", "0"], "argument --steps: invalid value '0': expected a positive integer"),
        (["--prompt", "x", "--dtype", "float16", "--device", "cpu"], "dtype float16 cannot run on device cpu"),
        (["--prompt", "x", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["--prompt", "x", "--device", "cuda:0"], "device 'cuda:0' is not available"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(model_dir, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["generate", *argv] if "--model" in argv else ["generate", "--model", str(model_dir), *argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "never")]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("condkit: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()


def test_malformed_jsonl_names_the_line(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--prompts-file", str(prompts), "--out", str(tmp_path / "o"))
    assert code == 2 and "p.jsonl line 2: invalid JSON" in err
    assert not (tmp_path / "o").exists()


def test_not_a_pipeline_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "empty"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "is not a diffusers pipeline folder (no model_index.json)" in err


def test_output_path_under_a_file_is_refused(model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", "x", "--out", str(blocker / "out"))
    assert code == 2 and "is not a folder" in err
    assert blocker.read_text() == "keep me"


def _word_embedding_file(model_dir, word, token, path):
    """An embedding file whose vectors are `word`'s own token rows, so "<token>" must draw exactly what `word` does."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from condkit.conditioning.embedding_formats import LearnedEmbedding, write_embedding

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    rows = encoder.get_input_embeddings().weight[word_ids].detach().clone()
    write_embedding(LearnedEmbedding(token, [rows]), path)
    return path


def test_generate_with_an_embedding_draws_what_its_vector_means(model_dir, tmp_path, capsys):
    from PIL import Image

    embedding = _word_embedding_file(model_dir, "circle", "<thing>", tmp_path / "thing.safetensors")
    common = ["--model", str(model_dir), "--steps", "2", "--height", "32", "--width", "32", "--quiet", "--no-grid"]
    code, _, err = run(capsys, "generate", *common, "--prompt", "a red circle", "--out", str(tmp_path / "words"))
    assert code == 0, err
    code, _, err = run(capsys, "generate", *common, "--embedding", str(embedding), "--prompt", "a red <thing>",
                       "--out", str(tmp_path / "token"))
    assert code == 0, err
    code, _, err = run(capsys, "generate", *common, "--embedding", f"<other>={embedding}", "--prompt", "a red <other>",
                       "--out", str(tmp_path / "renamed"))
    assert code == 0, err
    words = Image.open(tmp_path / "words" / "00000_0.png").tobytes()
    assert Image.open(tmp_path / "token" / "00000_0.png").tobytes() == words
    assert Image.open(tmp_path / "renamed" / "00000_0.png").tobytes() == words
    assert json.loads((tmp_path / "renamed" / "00000_0.json").read_text())["embeddings"] == {"<other>": f"<other>={embedding}"}


def test_generate_refuses_a_bad_embedding_before_writing(model_dir, tmp_path, capsys):
    from condkit.conditioning.embedding_formats import LearnedEmbedding, write_embedding

    wide = tmp_path / "wide.safetensors"
    write_embedding(LearnedEmbedding("<wide>", [__import__("torch").zeros(1, 7)]), wide)
    for value, message in ((str(tmp_path / "missing.pt"), "no such file (expected FILE or TOKEN=FILE)"),
                           (str(wide), "7")):
        out = tmp_path / "out"
        code, _, err = run(capsys, "generate", "--model", str(model_dir), "--embedding", value, "--prompt", "x",
                           "--steps", "1", "--height", "32", "--width", "32", "--out", str(out), "--quiet")
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out.exists() or not any(out.iterdir())
