"""Atomic writes and safe reading of state dicts (condkit.files)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from condkit.files import load_pickle_safely, read_state_dict, write_atomically, write_folder_atomically


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
