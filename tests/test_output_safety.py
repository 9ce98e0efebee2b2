"""Earlier output is never lost: refused without --overwrite, one run per folder, images never without metadata."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from condkit.cli import main
from condkit.pipelines import generate as generate_module
from condkit.pipelines.output_folder import claim_output_folder
from tiny_models import tiny_sd_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def generate(model_dir, out, *extra):
    return main(["generate", "--model", str(model_dir), "--prompt", "a red circle", "--num-images", "3", "--steps", "1",
                 "--out", str(out), "--quiet", *extra])


def test_a_second_run_into_the_same_folder_needs_overwrite(model_dir, tmp_path, capsys):
    assert generate(model_dir, tmp_path / "o") == 0
    first = {path.name: path.read_bytes() for path in (tmp_path / "o").iterdir()}
    assert generate(model_dir, tmp_path / "o") == 2
    assert "already holds 7 image/metadata file(s)" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (tmp_path / "o").iterdir()} == first
    assert generate(model_dir, tmp_path / "o", "--seed", "9", "--overwrite") == 0
    assert sorted(path.name for path in (tmp_path / "o").glob("*.png")) == ["00000_9.png", "00001_10.png", "00002_11.png", "grid.png"]


def test_two_runs_cannot_hold_one_folder(tmp_path):
    with claim_output_folder(tmp_path / "o"):
        with pytest.raises(FileExistsError, match="another condkit run is writing to"):
            with claim_output_folder(tmp_path / "o"):
                pass
        assert (tmp_path / "o" / ".condkit.lock").exists()  # the first run's lock survived the refusal
    assert not (tmp_path / "o").exists()  # nothing was written, so the folder the claim made is gone again


def test_an_interrupted_save_leaves_no_image_without_metadata(model_dir, tmp_path, monkeypatch):
    writes = []
    real_write = generate_module.write_atomically

    def interrupted_after_four(path, write):
        if len(writes) == 4:
            raise KeyboardInterrupt
        writes.append(path.name)
        real_write(path, write)

    monkeypatch.setattr(generate_module, "write_atomically", interrupted_after_four)
    assert generate(model_dir, tmp_path / "o") == 130  # the CLI's exit status for an interruption
    names = sorted(path.name for path in (tmp_path / "o").iterdir())
    assert names == ["00000_0.json", "00000_0.png", "00001_1.json", "00001_1.png"]
    for png in (tmp_path / "o").glob("*.png"):
        assert png.with_suffix(".json").exists()


def test_sigterm_stops_a_run_cleanly(model_dir, tmp_path):
    out = tmp_path / "o"
    process = subprocess.Popen(
        [sys.executable, "-m", "condkit", "generate", "--model", str(model_dir), "--prompt", "a red circle",
         "--num-images", "200", "--batch-size", "1", "--steps", "2", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / ".condkit.lock").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "condkit: interrupted" in err
    leftovers = [path.name for path in out.rglob("*")] if out.exists() else []
    assert not [name for name in leftovers if name.endswith(".tmp") or name == ".condkit.lock"], leftovers
    for png in out.glob("*.png") if out.exists() else []:
        assert png.with_suffix(".json").exists() or png.name == "grid.png"


def test_non_finite_latents_stop_generation_before_anything_is_written(tmp_path):
    from condkit import GenerationSettings, PromptRequest, generate as generate_images, load_conditioner
    from condkit.pipelines.generate import save_results

    pipe = tiny_sd_pipeline()
    pipe.unet.register_forward_hook(lambda module, args, output: (output[0] * float("nan"),))
    settings = GenerationSettings(steps=2, height=32, width=32)
    with pytest.raises(FloatingPointError, match=r"latents became non-finite at denoising step 1 .* nothing was written"):
        results = generate_images(pipe, load_conditioner("clip", pipe), [PromptRequest("a red circle")], settings)
        save_results(results, tmp_path / "o", {})
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        GenerationSettings(guidance=float("nan"))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        GenerationSettings(seed=-1)
