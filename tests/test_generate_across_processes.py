"""`torchrun … -m condkit generate` shares the images out over processes and writes exactly what one process writes."""

import os
import subprocess
import sys

import pytest

from tiny_models import tiny_sd_pipeline

PROMPTS = ["a red circle", "a blue square", "a (green:1.3) triangle", " ".join(["a yellow star above a red circle"] * 14)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def condkit_generate(launcher: list[str], model_dir, out, *extra: str) -> None:
    prompts = [argument for prompt in PROMPTS for argument in ("--prompt", prompt)]
    command = [*launcher, "-m", "condkit", "generate", "--model", str(model_dir), *prompts, "--negative", "blurry",
               "--num-images", "2", "--steps", "2", "--seed", "11", "--height", "32", "--width", "32", "--batch-size", "3",
               "--out", str(out), "--quiet", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]


def test_two_processes_write_byte_identical_images_metadata_and_grid(model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    condkit_generate([sys.executable], model_dir, one)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    condkit_generate(torchrun, model_dir, two)

    names = sorted(path.name for path in one.iterdir())
    assert len(names) == 2 * 2 * len(PROMPTS) + 1 and "grid.png" in names
    assert sorted(path.name for path in two.iterdir()) == names  # no lock file or partial file left behind
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_overwrite_across_processes_replaces_the_earlier_run(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00099_1.png").write_bytes(b"an earlier run's image")
    (out / "notes.txt").write_text("the user's own file")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    condkit_generate(torchrun, model_dir, out, "--overwrite", "--no-grid")
    names = sorted(path.name for path in out.iterdir())
    assert "00099_1.png" not in names and "notes.txt" in names and "grid.png" not in names
    assert len([name for name in names if name.endswith(".png")]) == 2 * len(PROMPTS)
