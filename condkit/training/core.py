"""CoRe: textual inversion with context regularization (Wu et al. 2024, arXiv 2408.15914).

    conditioner = CLIPConditioner.from_pipeline(pipe)
    method = CoRe(conditioner, "<toy>", "teddy", num_vectors=1)
    config = TrainingConfig(output_dir="runs/core", max_train_steps=300, train_batch_size=6,
                            learning_rate=5e-3)
    images = folder_dataset("toy/", caption_required=False)      # condkit.training.data
    train(method, pipe.unet, pipe.vae, pipe.scheduler, images, config, conditioner=conditioner)
    method.save_embedding("runs/core/learned_embeds.safetensors")

Prompts are textual inversion's (`TextualInversion.prompts_for`): an image's caption when it
contains the placeholder, used as written, else a template drawn from (seed, step, image index).

Each step adds to textual inversion's denoising loss the two regularizers of `core_regularizers`
on one regularization template, drawn from (seed, step) so a resumed run draws the same ones:
λ_emb · embedding regularization + λ_attn · attention regularization (defaults 1.5e-4 and 0.05,
the paper's). The attention branch reuses the step's noisy latents and timesteps; no image is
generated for a regularization prompt.

Norm rescaling: the paper holds the embedding's norm at its step-120 value until step 180. Here
`norm_window=(start, end)`: after optimizer step `start` each new row's norm is recorded, and
after every step in (start, end] each row is scaled back to that norm. The recorded norms are
part of the checkpoint, so a run resumed inside the window rescales to the same values.

`test_time_optimize` (see `core_test_time`) is the paper's inference-time refinement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from condkit.conditioning.clip import CLIPConditioner
from condkit.training.core_regularizers import SLOT, ContextRegularizer, RegularizationLosses
from condkit.training.core_templates import REGULARIZATION_TEMPLATES
from condkit.training.core_test_time import CoReAdjustment, test_time_optimize
from condkit.training.method import MethodOutput, TrainingBatch
from condkit.training.textual_inversion import TextualInversion

__all__ = ["CoRe", "CoReAdjustment", "RegularizationLosses", "REGULARIZATION_TEMPLATES", "test_time_optimize"]

REFERENCE_NORMS = "reference_norms"


class CoRe(TextualInversion):
    """Textual inversion of `placeholder` regularized towards its category word `initializer`.

    Args (beyond TextualInversion's):
        lambda_embedding, lambda_attention: weights of the two regularizers (0 switches one off
            and skips its computation).
        norm_window: (start, end) optimizer steps of the norm rescaling, or None for none.
        regularization_templates: prompts with one "{}"; default: the 100 of `core_templates`.
    """

    def __init__(
        self,
        conditioner: CLIPConditioner,
        placeholder: str,
        initializer: str,
        num_vectors: int = 1,
        templates: str = "object",
        seed: int = 0,
        *,
        lambda_embedding: float = 1.5e-4,
        lambda_attention: float = 0.05,
        norm_window: tuple[int, int] | None = (120, 180),
        regularization_templates: Sequence[str] = REGULARIZATION_TEMPLATES,
    ) -> None:
        for name, value in (("lambda_embedding", lambda_embedding), ("lambda_attention", lambda_attention)):
            if not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if norm_window is not None:
            start, end = norm_window
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError(f"norm_window must be (start, end) steps with 0 <= start <= end, got {norm_window}")
            norm_window = (start, end)
        if not regularization_templates:
            raise ValueError("regularization_templates is empty; expected prompts with one '{}' each")
        missing_slot = [template for template in regularization_templates if SLOT not in template]
        if missing_slot:
            raise ValueError(f"regularization template {missing_slot[0]!r} has no {SLOT!r} slot for the concept")
        super().__init__(conditioner, placeholder, initializer, num_vectors, templates, seed)
        self.lambda_embedding, self.lambda_attention = lambda_embedding, lambda_attention
        self.norm_window = norm_window
        self.regularization_templates = tuple(regularization_templates)
        self.regularizer = ContextRegularizer(conditioner, placeholder, initializer)
        rows = self.embeddings[0].new_rows
        self.register_buffer(REFERENCE_NORMS, torch.zeros(len(self.embeddings), num_vectors, device=rows.device))
        if norm_window is not None and norm_window[0] == 0:
            self._record_reference_norms()

    @property
    def method_name(self) -> str:
        return "CoRe"

    def settings(self) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(self.regularization_templates).encode()).hexdigest()[:16]
        return {**super().settings(), "lambda_embedding": self.lambda_embedding, "lambda_attention": self.lambda_attention,
                "norm_window": self.norm_window, "regularization_templates_sha256": digest}

    def regularization_template(self, step: int) -> str:
        """The template of optimizer step `step` (the same for every image and micro-batch of that step)."""
        rng = np.random.default_rng([self.seed, step])
        return self.regularization_templates[rng.integers(len(self.regularization_templates))]

    def regularization_losses(
        self, unet: nn.Module, template: str, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
        image_size: tuple[int, int],
    ) -> RegularizationLosses:
        """Both regularizers, unweighted; one whose weight is 0 is not computed (reported as 0)."""
        return self.regularizer.losses(unet, template, noisy_latents, timesteps, image_size,
                                       embedding=self.lambda_embedding > 0, attention=self.lambda_attention > 0)

    def forward(self, unet: nn.Module, conditioner: CLIPConditioner, batch: TrainingBatch, noisy_latents: torch.Tensor,
                timesteps: torch.Tensor) -> MethodOutput:
        prediction = super().forward(unet, conditioner, batch, noisy_latents, timesteps)
        template = self.regularization_template(batch.step)
        losses = self.regularization_losses(unet, template, noisy_latents, timesteps, batch.image_size)
        return MethodOutput(prediction, losses.weighted(self.lambda_embedding, self.lambda_attention))

    def after_optimizer_step(self, step: int) -> None:
        if self.norm_window is None:
            return
        start, end = self.norm_window
        if step == start:
            self._record_reference_norms()
        elif start < step <= end:
            self._rescale_to_reference_norms()

    def _record_reference_norms(self) -> None:
        with torch.no_grad():
            for index, table in enumerate(self.embeddings):
                self.reference_norms[index] = table.new_rows.float().norm(dim=-1)

    def _rescale_to_reference_norms(self) -> None:
        with torch.no_grad():
            for index, table in enumerate(self.embeddings):
                norms = table.new_rows.float().norm(dim=-1, keepdim=True)
                scale = self.reference_norms[index].unsqueeze(-1) / norms
                table.new_rows.mul_(scale.to(table.new_rows.dtype))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().trainable_state_dict(), REFERENCE_NORMS: self.reference_norms.detach()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        norms = state.pop(REFERENCE_NORMS, None)
        if norms is not None:
            self.reference_norms.copy_(norms)
        super().load_trainable_state_dict(state)
