"""Writing files and folders atomically, and reading tensors without running code.

Writes go to a hidden temporary sibling that is moved into place with one `os.replace`, so a
process killed at any moment leaves either the old file or folder or the new one, never half of
one. Reads of torch pickles (.pt, .pth, .bin, .pkl) go through `torch.load(weights_only=True)`:
tensors, dicts, lists, strings and numbers only, never code; .safetensors files hold tensors only.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

__all__ = [
    "load_pickle_safely",
    "read_state_dict",
    "replace_folder",
    "staging_folder",
    "write_atomically",
    "write_folder_atomically",
]


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)`, then move the temporary file onto `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def staging_folder(folder: str | os.PathLike) -> Path:
    """The hidden sibling a folder is written into before `replace_folder` moves it into place.

    Its name depends only on `folder`, so several processes writing one folder together agree on it.
    """
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.tmp")


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Move a completely written `staging` folder to `folder`, replacing a folder already there."""
    staging, folder = Path(staging), Path(folder)
    if not folder.exists():
        os.replace(staging, folder)
        return folder
    stale = folder.with_name(f".{folder.name}.stale")
    if stale.exists():
        shutil.rmtree(stale)
    os.replace(folder, stale)
    os.replace(staging, folder)
    shutil.rmtree(stale)
    return folder


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(staging_folder)` on an empty folder, then move it onto `folder` (one process)."""
    staging = staging_folder(folder)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        write(staging)
        return replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_pickle_safely(path: str | os.PathLike, map_location: Any = "cpu", allowed: Sequence[type] = ()) -> Any:
    """A torch pickle through torch.load(weights_only=True); one that needs code is refused with a ValueError.

    allowed: classes rebuilt from plain data that may appear besides tensors, dicts, lists, strings
    and numbers (e.g. torch.nn.ParameterDict in original textual-inversion files).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        culprit = found.group(1) if found else "an object that is not plain data"
        raise ValueError(
            f"refusing to load {path}: it needs arbitrary unpickling ({culprit}), which could run code; only "
            "weights-only torch files (tensors, dicts, lists, strings and numbers) are read"
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a torch pickle holding a flat dict of tensors (read safely)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = load_pickle_safely(path)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return state
