"""An output folder that one run owns: earlier output is never replaced unless asked, runs never mix.

    with claim_output_folder("outputs", overwrite=False) as folder:
        ...write images...

Claiming refuses a folder that already holds images or metadata (*.png, *.json) unless `overwrite`;
with `overwrite` it removes the earlier run's files (condkit's names only: NNNNN_SEED.png/.json,
grid.png, eval.json) so the folder holds one run, never a mix. It also takes an exclusive lock (`.condkit.lock`, flock) that a second run writing to the same folder
cannot get, so two concurrent runs fail fast instead of replacing each other's files. The lock goes
away with the process, also when it is killed. A folder the claim created is removed again if the
run ends without writing anything into it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".condkit.lock"
OUTPUT_PATTERNS = ("*.png", "*.json")
CONDKIT_OUTPUT = re.compile(r"\d{5}_\d+\.(png|json)|grid\.png|eval\.json")


def earlier_output(folder: Path) -> list[Path]:
    return sorted(path for pattern in OUTPUT_PATTERNS for path in folder.glob(pattern)) if folder.is_dir() else []


def check_writable(folder: str | os.PathLike) -> Path:
    """Fail early if `folder` cannot be created or written; creates nothing itself."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"output path {str(folder)!r} is not a folder ({str(existing)!r} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {str(folder)!r} is not writable")
    return folder


def check_output_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early, creating nothing, if `folder` cannot be written or holds earlier output (without `overwrite`)."""
    folder = check_writable(folder)
    found = earlier_output(folder)
    if found and not overwrite:
        raise FileExistsError(
            f"output folder {str(folder)!r} already holds {len(found)} image/metadata file(s) (e.g. {found[0].name}); "
            "choose another --out or pass --overwrite"
        )
    return folder


@contextmanager
def claim_output_folder(folder: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    folder = check_output_folder(folder, overwrite)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / LOCK_NAME, "a")
    _lock_exclusively(lock, folder)  # raises, touching nothing, if another run holds the folder
    try:
        if overwrite:
            for path in earlier_output(folder):
                if CONDKIT_OUTPUT.fullmatch(path.name):
                    path.unlink()
        yield folder
    finally:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        lock.close()
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _lock_exclusively(lock, folder: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no flock on this platform: the earlier-output check still holds
        return
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FileExistsError(f"another condkit run is writing to {str(folder)!r}; wait for it or choose another --out") from None
