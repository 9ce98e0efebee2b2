"""Generation split across processes: `accelerate launch -m condkit generate …` or `torchrun -m condkit …`.

Every image already has its own seed and depends only on its own prompt, so the images can be
shared out freely: accelerate's `split_between_processes` gives each process a contiguous share,
each process writes its images under the names a one-process run gives them, and the main
process writes the grid once every process has written. Run as one process (no launcher), this is
exactly `generate` + `save_results`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from accelerate import PartialState
from PIL import Image

from condkit.conditioning.base import Conditioner
from condkit.pipelines.generate import GenerationSettings, PromptRequest, expand_requests, generate, save_grid, save_results
from condkit.pipelines.output_folder import claim_output_folder
from condkit.processes import process_state
from condkit.verbosity import disable_progress_bars, enable_progress_bars, progress_bars_enabled


def generate_and_save(
    pipe: Any,
    conditioner: Conditioner,
    requests: Iterable[PromptRequest],
    settings: GenerationSettings,
    out_dir: str | os.PathLike,
    run: dict[str, Any],
    overwrite: bool = False,
    grid: bool = True,
    **pipeline_kwargs: Any,
) -> list[Path]:
    """Generate every requested image and write it to `out_dir`, this process's share of them when
    launched on several; returns the paths of all images (on every process)."""
    state = process_state()
    jobs = expand_requests(requests, settings)
    if not jobs:
        raise ValueError("no prompts to generate")
    claim = claim_output_folder(out_dir, overwrite) if state.is_main_process else nullcontext(Path(out_dir))
    with claim as folder:
        state.wait_for_everyone()  # the main process holds (and with --overwrite has cleared) the folder
        results = []
        with state.split_between_processes(list(enumerate(jobs))) as share:
            if share:
                one_each = replace(settings, num_images_per_prompt=1)  # the jobs carry their seeds already
                with _bars_on_main_process_only(state):
                    results = generate(pipe, conditioner, [job for _, job in share], one_each, **pipeline_kwargs)
                save_results(results, folder, run, grid=False, first_index=share[0][0])
        state.wait_for_everyone()
        paths = [Path(folder) / f"{index:05d}_{job.seed}.png" for index, job in enumerate(jobs)]
        if grid and state.is_main_process:
            # one process holds every image already; the main one of several reads the others' back
            images = [result.image for result in results] if state.num_processes == 1 else [_read(path) for path in paths]
            save_grid(images, Path(folder), run)
    return paths


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


@contextmanager
def _bars_on_main_process_only(state: PartialState) -> Iterator[None]:
    hide = not state.is_main_process and progress_bars_enabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()
