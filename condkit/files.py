"""Writing files and folders atomically, and reading tensors without running code.

Writes go to a hidden temporary sibling that is moved into place with one `os.replace`, so a
process killed at any moment leaves either the old file or folder or the new one, never half of
one. What is written is flushed to disk (fsync) before the rename, and the rename itself after it,
so a power cut cannot leave an empty file behind a completed rename. Files and folders get the
permissions a plain `open()` / `mkdir()` would give them (0o666 / 0o777 less the umask).

Reads of torch pickles (.pt, .pth, .bin, .pkl) go through `torch.load(weights_only=True)`:
tensors, dicts, lists, strings and numbers only, never code; .safetensors files hold tensors only.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import shutil
import stat
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
    """Call `write(temporary_path)`, then move the temporary file onto `path` in one rename.

    The file ends up with the mode a plain open() would create it with (0o666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary, mode = _create_temporary(path)
    try:
        write(temporary)
        _fsync(temporary)
        if stat.S_IMODE(temporary.stat().st_mode) != mode:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def staging_folder(folder: str | os.PathLike) -> Path:
    """The hidden sibling a folder is written into before `replace_folder` moves it into place.

    Its name depends only on `folder`, so several processes writing one folder together agree on it.
    """
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.tmp")


def replace_folder(staging: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Move a completely written `staging` folder to `folder`, replacing what is already there.

    Every file and folder in `staging` is flushed to disk first.
    """
    staging, folder = Path(staging), Path(folder)
    _fsync_tree(staging)
    if not os.path.lexists(folder):
        os.replace(staging, folder)
    else:
        stale = folder.with_name(f".{folder.name}.stale")
        _remove(stale)
        os.replace(folder, stale)
        os.replace(staging, folder)
        _remove(stale)
    _fsync_folder(folder.parent)
    return folder


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(staging_folder)` on an empty folder, then move it onto `folder` (one process)."""
    staging = staging_folder(folder)
    _remove(staging)
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
    and numbers (e.g. torch.nn.ParameterDict in original textual-inversion files). torch < 2.5 has
    no scoped allow-list, so files holding them are refused there.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    allow = getattr(torch.serialization, "safe_globals", None)
    scope = allow(list(allowed)) if allowed and allow is not None else contextlib.nullcontext()
    try:
        with scope:
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower() and "GLOBAL" not in str(error):
            raise ValueError(f"cannot read {path} as a weights-only torch file: {error}") from error
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        culprit = found.group(1) if found else "an object that is not plain data"
        raise ValueError(
            f"refusing to load {path}: it needs arbitrary unpickling ({culprit}), i.e. it needs arbitrary code to "
            "unpickle; refusing it, as only weights-only torch files (tensors, dicts, lists, strings and numbers) are read"
        ) from None
    except Exception as error:  # not a torch file at all: torch raises KeyError, EOFError, RuntimeError, ...
        raise ValueError(f"cannot read {path} as a weights-only torch file ({type(error).__name__}: {error})") from error


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


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new empty hidden sibling of `path`, and the mode open() would give a new file (0o666 less the umask).

    The file is created with 0o666 so the umask (and any default ACL) applies as for open(); the
    owner may read and write it until it is complete, whatever the umask.
    """
    for _ in range(100):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(handle).st_mode)
            if mode & 0o600 != 0o600 and hasattr(os, "fchmod"):
                os.fchmod(handle, mode | 0o600)
        except BaseException:
            os.close(handle)
            temporary.unlink(missing_ok=True)
            raise
        os.close(handle)
        return temporary, mode
    raise FileExistsError(f"no free temporary name beside {path}")


def _fsync(path: str | os.PathLike) -> None:
    flags = (os.O_RDWR | getattr(os, "O_BINARY", 0)) if os.name == "nt" else os.O_RDONLY  # Windows flushes writable handles only
    handle = os.open(path, flags)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_folder(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (new names, renames) durable; Windows has no fsync for folders."""
    if os.name != "nt":
        _fsync(folder)


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            file = os.path.join(root, name)
            if os.path.isfile(file) and not os.path.islink(file):
                _fsync(file)
        _fsync_folder(root)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree at `path`, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
