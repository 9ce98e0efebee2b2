"""What condkit prints besides results: progress bars (switchable for the process) and log messages.

Modules log through `logging.getLogger(__name__)` under the "condkit" logger. Warnings that change
results — a prompt truncated, captions cut — are logged at WARNING and reach stderr even when no
logging is configured (Python's last-resort handler). `quiet()` is what the CLI's `--quiet` does:
no progress bars, and only warnings and errors from condkit, diffusers and transformers; it never
hides a condkit warning.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.auto import tqdm

_progress_bars = True


def disable_progress_bars() -> None:
    global _progress_bars
    _progress_bars = False


def enable_progress_bars() -> None:
    global _progress_bars
    _progress_bars = True


def progress_bars_enabled() -> bool:
    return _progress_bars


def progress_bar(*args: Any, show: bool | None = None, **kwargs: Any) -> tqdm:
    """tqdm; `show` None follows the process-wide switch, True or False decides for this bar."""
    return tqdm(*args, disable=not (_progress_bars if show is None else show), **kwargs)


class _CommandLineHandler(logging.Handler):
    """"condkit: warning: ..." on whatever sys.stderr is at the time (pytest swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"condkit: {record.levelname.lower()}: {record.getMessage()}\n")


def log_to_stderr() -> None:
    """The CLI's logging: condkit's messages as one line each on stderr, info and above."""
    logger = logging.getLogger("condkit")
    if not any(isinstance(handler, _CommandLineHandler) for handler in logger.handlers):
        logger.addHandler(_CommandLineHandler())
    logger.setLevel(logging.INFO)


def quiet() -> None:
    """No progress bars anywhere; info from condkit and the libraries it drives (diffusers, transformers,
    datasets) silenced, condkit's warnings kept."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    disable_progress_bars()
    logging.getLogger("condkit").setLevel(logging.WARNING)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
