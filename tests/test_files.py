"""Atomic writes and safe reading of state dicts (condkit.files)."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from condkit import load_conditioner
from condkit.conditioning.ella_connector import load_ella_checkpoint
from condkit.conditioning.embedding_formats import LearnedEmbedding, read_embedding, write_embedding
from condkit.conditioning.long_clip_convert import load_longclip_state_dict
from condkit.files import load_pickle_safely, read_state_dict, write_atomically, write_folder_atomically
from condkit.pipelines.generate import GeneratedImage, image_grid, save_results
from tiny_models import tiny_sd_pipeline


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_atomically(tmp_path / "note.txt", lambda temporary: temporary.write_text("old"))
    with pytest.raises(ZeroDivisionError):
        write_atomically(path, lambda temporary: (temporary.write_text("half"), 1 / 0))
    assert path.read_text() == "old" and [child.name for child in tmp_path.iterdir()] == ["note.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    folder = write_folder_atomically(tmp_path / "out", lambda staging: (staging / "a").write_text("1"))
    write_folder_atomically(folder, lambda staging: (staging / "b").write_text("2"))
    assert [child.name for child in folder.iterdir()] == ["b"]
    with pytest.raises(ZeroDivisionError):
        write_folder_atomically(folder, lambda staging: ((staging / "c").write_text("3"), 1 / 0))
    assert [child.name for child in folder.iterdir()] == ["b"] and [child.name for child in tmp_path.iterdir()] == ["out"]


def test_state_dicts_read_from_safetensors_and_weights_only_pickles(tmp_path):
    tensors = {"weight": torch.arange(4.0)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        assert torch.equal(read_state_dict(tmp_path / name)["weight"], tensors["weight"])
    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    torch.save({"weight": tensors["weight"], "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"does not hold a flat dict of tensors"):
        read_state_dict(tmp_path / "mixed.pt")


def test_pickles_that_need_code_are_refused_unless_their_class_is_allowed(tmp_path):
    torch.save({"weight": torch.ones(1), "code": np.dtype}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*code\.pt: it needs arbitrary unpickling \(numpy\.dtype\)"):
        load_pickle_safely(tmp_path / "code.pt")
    torch.save({"rows": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2))})}, tmp_path / "rows.pt")
    with pytest.raises(ValueError, match=r"weights-only"):
        load_pickle_safely(tmp_path / "rows.pt")
    rows = load_pickle_safely(tmp_path / "rows.pt", allowed=[torch.nn.ParameterDict])["rows"]
    assert torch.equal(rows["*"], torch.ones(2))


# ------------------------------------------------------------------ permissions and flushing

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes and umask")


@pytest.fixture
def umask():
    """Set the process umask for one test, as a shell's `umask` would; restored afterwards."""
    original = os.umask(0o022)
    os.umask(original)
    yield os.umask
    os.umask(original)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_open_mode(folder, umask_value: int) -> int:
    """The mode a plain open() gives a new file in `folder` (umask and any default ACL applied)."""
    reference = folder / f"reference-{umask_value:o}"
    with open(reference, "w"):
        pass
    created = mode(reference)
    os.chmod(reference, 0o600)
    reference.unlink()
    return created


@posix_only
@pytest.mark.parametrize("umask_value", [0o022, 0o002, 0o077, 0o277])
def test_files_get_the_mode_a_plain_open_gives_them(tmp_path, umask, umask_value):
    umask(umask_value)
    expected = plain_open_mode(tmp_path, umask_value)
    path = write_atomically(tmp_path / "note.txt", lambda temporary: temporary.write_text("new"))
    assert mode(path) == expected and path.read_text() == "new"  # written even where the umask takes the owner's write bit
    if umask_value == 0o022:
        assert expected == 0o644  # not mkstemp's 0o600
    os.chmod(path, 0o600)


@posix_only
def test_folders_get_the_modes_plain_mkdir_and_open_give_them(tmp_path, umask):
    umask(0o002)
    expected_file = plain_open_mode(tmp_path, 0o002)
    (tmp_path / "reference").mkdir()
    expected_folder = mode(tmp_path / "reference")

    def write(staging):
        (staging / "sub").mkdir()
        (staging / "sub" / "a").write_text("1")

    folder = write_folder_atomically(tmp_path / "out", write)
    assert mode(folder) == mode(folder / "sub") == expected_folder and expected_folder != 0o700
    assert mode(folder / "sub" / "a") == expected_file


@pytest.fixture
def disk_events(monkeypatch):
    """Every fsync (as the path it flushed) and os.replace (as "replace TARGET"), in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(handle):
        events.append(os.readlink(f"/proc/self/fd/{handle}"))
        real_fsync(handle)

    def replace(source, target):
        events.append(f"replace {target}")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads the flushed paths from /proc")


@linux_only
def test_files_are_flushed_to_disk_before_the_rename(tmp_path, disk_events):
    path = write_atomically(tmp_path / "note.txt", lambda temporary: temporary.write_text("new"))
    flushed, rename, folder = disk_events
    assert Path(flushed).name.startswith(".note.txt.") and flushed.endswith(".tmp")
    assert rename == f"replace {path}"
    assert folder == str(tmp_path)  # the rename itself made durable


@linux_only
def test_folders_are_flushed_file_by_file_and_folder_by_folder_before_the_rename(tmp_path, disk_events):
    def write(staging):
        (staging / "sub").mkdir()
        (staging / "sub" / "a").write_text("1")
        (staging / "b").write_text("2")

    folder = write_folder_atomically(tmp_path / "out", write)
    staging = str(tmp_path / ".out.tmp")
    rename = disk_events.index(f"replace {folder}")
    assert sorted(disk_events[:rename]) == sorted([f"{staging}/sub/a", f"{staging}/b", f"{staging}/sub", staging])
    assert disk_events[rename + 1 :] == [str(tmp_path)]


def test_a_folder_replaces_a_file_or_a_link_there_and_leaves_no_stale_copy(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("the link's target is not touched")
    (tmp_path / "as_file").write_text("old")
    (tmp_path / "as_link").symlink_to(tmp_path / "target")
    for name in ("as_file", "as_link"):
        folder = write_folder_atomically(tmp_path / name, lambda staging: (staging / "new").write_text("1"))
        assert folder.is_dir() and not folder.is_symlink() and [p.name for p in folder.iterdir()] == ["new"]
    assert (tmp_path / "target" / "keep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["as_file", "as_link", "target"]


def test_a_file_that_is_not_a_torch_file_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "text.pt").write_text("hello, not a pickle")
    (tmp_path / "empty.bin").write_bytes(b"")
    for name in ("text.pt", "empty.bin"):
        with pytest.raises(ValueError, match=rf"cannot read .*{name} as a weights-only torch file"):
            load_pickle_safely(tmp_path / name)


# ------------------------------------------------------------------ the callers that write and read through condkit.files


@posix_only
def test_embeddings_results_and_saved_conditioners_honour_the_umask(tmp_path, umask):
    umask(0o022)
    (embedding,) = write_embedding(LearnedEmbedding("<x>", [torch.ones(1, 32)]), tmp_path / "learned_embeds.safetensors")
    images = [GeneratedImage(Image.new("RGB", (8, 8), "red"), "a", None, seed) for seed in (1, 2)]
    paths = save_results(images, tmp_path / "out", {})
    folder = load_conditioner("clip", tiny_sd_pipeline()).save_pretrained(tmp_path / "clip")
    written = [embedding, *paths, paths[0].with_suffix(".json"), tmp_path / "out" / "grid.png", folder / "conditioner_config.json"]
    (tmp_path / "reference").mkdir()
    assert {mode(path) for path in written} == {plain_open_mode(tmp_path, 0o022)} != {0o600}  # not mkstemp's 0o600
    assert mode(folder) == mode(tmp_path / "reference") != 0o700  # not mkdtemp's 0o700


def test_a_saved_conditioner_replaces_a_folder_whole_and_a_failed_save_changes_nothing(tmp_path):
    pipe = tiny_sd_pipeline()
    conditioner = load_conditioner("clip", pipe)
    (tmp_path / "empty").mkdir()
    assert conditioner.save_pretrained(tmp_path / "empty") == tmp_path / "empty"  # an empty folder is not refused

    folder = tmp_path / "unit"
    folder.mkdir()
    (folder / "old.txt").write_text("from an earlier save")
    with pytest.raises(FileExistsError, match="already exists; choose another folder or pass overwrite=True"):
        conditioner.save_pretrained(folder)
    assert [p.name for p in folder.iterdir()] == ["old.txt"]

    def fail_halfway(staging):
        (staging / "part.bin").write_bytes(b"half")
        raise OSError("disk full")

    conditioner.save_parts = fail_halfway
    with pytest.raises(OSError, match="disk full"):
        conditioner.save_pretrained(folder, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        conditioner.save_pretrained(tmp_path / "new")
    assert [p.name for p in folder.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "unit"]  # no staging folder left

    del conditioner.save_parts
    conditioner.save_pretrained(folder, overwrite=True)
    assert [p.name for p in folder.iterdir()] == ["conditioner_config.json"]  # replaced whole, old.txt gone
    assert load_conditioner(folder, pipe).config == conditioner.config


def old_image_grid(images, columns):
    """condkit's own grid before it used diffusers' make_image_grid (white where the last row is short)."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


@pytest.mark.parametrize("count, columns", [(1, 1), (4, 2), (5, 2), (7, 4), (3, 4), (6, 3)])
@pytest.mark.parametrize("image_mode", ["RGB", "L"])
def test_the_image_grid_is_the_same_as_before_with_white_after_the_last_image(count, columns, image_mode):
    generator = np.random.default_rng(count * 10 + columns)
    shape = (6, 10, 3) if image_mode == "RGB" else (6, 10)
    images = [Image.fromarray(generator.integers(0, 255, shape, dtype=np.uint8), image_mode) for _ in range(count)]
    grid = image_grid(images, columns)
    assert grid.mode == "RGB" and np.array_equal(np.asarray(grid), np.asarray(old_image_grid(images, columns)))


def test_ella_checkpoints_are_read_through_condkit_files(tmp_path):
    from condkit.conditioning import ella_connector

    assert ella_connector.read_state_dict is read_state_dict
    torch.save({"weight": torch.ones(1), "code": np.dtype}, tmp_path / "code.pt")
    (tmp_path / "text.bin").write_text("not a checkpoint")
    for name in ("code.pt", "text.bin"):
        with pytest.raises(ValueError, match="weights-only"):
            load_ella_checkpoint(tmp_path / name)


def test_long_clip_checkpoints_are_read_through_condkit_files(tmp_path):
    save_file({"positional_embedding": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module.positional_embedding": torch.ones(2, 2)}, "epoch": 3}, tmp_path / "w.pt")
    assert torch.equal(load_longclip_state_dict(tmp_path / "w.safetensors")["positional_embedding"], torch.zeros(2, 2))
    assert torch.equal(load_longclip_state_dict(tmp_path / "w.pt")["positional_embedding"], torch.ones(2, 2))
    torch.save({"weight": torch.ones(1), "code": np.dtype}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*code\.pt: .*needs arbitrary code to unpickle; refusing it"):
        load_longclip_state_dict(tmp_path / "code.pt")


def test_original_textual_inversion_files_need_their_parameter_dict_allowed(tmp_path):
    rows = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(1, 4))})
    torch.save({"string_to_param": rows, "string_to_token": {"*": 265}, "name": "old"}, tmp_path / "old.pt")
    assert torch.equal(read_embedding(tmp_path / "old.pt").vectors[0], torch.ones(1, 4))
    with pytest.raises(ValueError, match="weights-only"):
        load_pickle_safely(tmp_path / "old.pt")  # allowed only where the embedding reader asks for it
