"""The run folder of textual inversion and CoRe: the learned token saved as a conditioner unit.

    save_token_run(out, method, conditioner, result, summary, overwrite=resume)

RUN/conditioner is a "clip-embeddings" unit (the family's CLIP conditioner plus the learned token, see
condkit.conditioning.learned_tokens) for SD, SDXL, SD3 and Flux alike, so `condkit generate --conditioner RUN`
uses the token with no --embedding flag; RUN/learned_embeds.safetensors stays the file other tools read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from condkit.conditioning.learned_tokens import with_learned_tokens

from .loop import TrainingResult
from .model_card import RunSummary
from .run_folder import CONDITIONER, finish_run


def save_token_run(folder: str | Path, method: Any, conditioner: Any, result: TrainingResult, summary: RunSummary, *,
                   overwrite: bool = False, push_to_hub: str | None = None) -> Path:
    """Write RUN/conditioner (the token as a unit), the loss log and curve and the model card; returns RUN/conditioner."""
    folder = Path(folder)
    unit = with_learned_tokens(conditioner, [method.learned_embedding(result.last_step)])
    saved = unit.save_pretrained(folder / CONDITIONER, overwrite=overwrite)
    finish_run(folder, result, summary, push_to_hub=push_to_hub)
    return saved
