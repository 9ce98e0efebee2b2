"""benchmarks/vae_shapes_by_size.py: ground truth passes every cell; a blur loses the small shapes first."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "vae_shapes_by_size.py"


@pytest.fixture(scope="module")
def by_size():
    spec = importlib.util.spec_from_file_location("vae_shapes_by_size", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_renders_that_come_back_unchanged_are_all_credited(by_size):
    table = by_size.binding_by_shape_and_size(lambda images: images, scenes_per_cell=3)
    assert all(value == 1.0 for row in table.values() for value in row.values())
    assert set(table["cross"]) == {"small", "medium", "large"}


def test_a_blur_loses_small_shapes_before_large_ones(by_size):
    blur = lambda images: F.avg_pool2d(F.pad(images, (3, 3, 3, 3), mode="replicate"), 7, stride=1)  # noqa: E731
    table = by_size.binding_by_shape_and_size(blur, scenes_per_cell=3)
    small = sum(row["small"] for row in table.values())
    large = sum(row["large"] for row in table.values())
    assert small < large and large >= 4.0


def test_a_folder_without_a_vae_is_refused_in_one_line(by_size, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["vae_shapes_by_size.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_status:
        by_size.main()
    assert exit_status.value.code == 2 and "holds no config.json" in capsys.readouterr().err.strip().splitlines()[-1]


def test_no_scenes_per_cell_is_refused_in_one_line(by_size, tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["vae_shapes_by_size.py", str(tmp_path), "--scenes", "0"])
    with pytest.raises(SystemExit) as exit_status:
        by_size.main()
    assert exit_status.value.code == 2 and "--scenes must be at least 1, got 0" in capsys.readouterr().err.strip().splitlines()[-1]
