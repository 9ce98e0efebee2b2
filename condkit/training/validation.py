"""Validation images while training: the pipeline renders the validation prompts through the conditioner.

    validate = ValidationRenderer(pipe, conditioner, ["a photo of <toy> on a beach"], seed=0)
    train(method, pipe.unet, pipe.vae, pipe.scheduler, data, TrainingConfig(..., validation_steps=100),
          conditioner=conditioner, validate=validate)

Every `validation_steps` steps (and at the end) the loop calls the renderer on the main process,
without gradients, with the method in eval mode and every global generator restored afterwards,
so validation never changes the training curve. The renderer generates one image per prompt
(`images_per_prompt` for more) with `condkit.pipelines.generate`, the same path as `condkit
generate` — so the images show what the saved conditioner will give — each image seeded from
`seed` alone, so grids of different steps compare like for like. The loop writes them as NN.png
and a grid.png into RUN/validation/step-NNNNNN/.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from condkit.pipelines.generate import GenerationSettings, PromptRequest, generate
from condkit.verbosity import disable_progress_bars, enable_progress_bars, progress_bars_enabled

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


class ValidationRenderer:
    def __init__(
        self,
        pipe: Any,
        conditioner: Any,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        images_per_prompt: int = 1,
    ) -> None:
        if not prompts:
            raise ValueError("no validation prompts given")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"validation prompt {prompt!r} is empty; expected text")
        self.pipe = pipe
        self.conditioner = conditioner
        self.prompts = list(prompts)
        self.settings = GenerationSettings(steps=steps, guidance=guidance, seed=seed,
                                           num_images_per_prompt=images_per_prompt, batch_size=len(prompts))

    def __call__(self, step: int, method: Any) -> list[Image.Image]:
        with _bars_off():
            results = generate(self.pipe, self.conditioner, [PromptRequest(prompt) for prompt in self.prompts],
                               self.settings)
        return [result.image for result in results]


@contextlib.contextmanager
def _bars_off() -> Iterator[None]:
    """No generation bar inside the training bar."""
    shown = progress_bars_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            enable_progress_bars()
