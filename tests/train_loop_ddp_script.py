"""A tiny training setup for the loop's tests, runnable under torchrun to train on several processes.

    torchrun --standalone --nproc_per_node 2 tests/train_loop_ddp_script.py OUT_DIR
    python tests/train_loop_ddp_script.py OUT_DIR --mixed-precision bf16
    torchrun --standalone --nproc_per_node 2 tests/train_loop_ddp_script.py --condkit train adapter ...

Each process writes OUT_DIR/rank<r>.json (the image indices it trained on, its losses, the dtype
of the UNet's predictions) and OUT_DIR/rank<r>.safetensors (its trainable weights after
training). A run of its own in a fresh interpreter also lets a test pick a mixed precision,
which accelerate fixes once per process. With --condkit the rest of the line is a condkit command
line, run on every process (the same command a user would start with accelerate launch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import tiny_sd_components  # noqa: E402

from condkit.training.loop import TrainingBatch, TrainingConfig, TrainingMethod, train  # noqa: E402

COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
]  # fmt: skip


def colour_dataset(count: int = 8, size: int = 16) -> list[tuple[Image.Image, str]]:
    """Solid-colour images captioned by their index, as (image, caption) pairs."""
    return [(Image.new("RGB", (size, size), COLOURS[i % len(COLOURS)]), f"colour {i}") for i in range(count)]


class CaptionOffset(TrainingMethod):
    """Text-encoder states of the caption plus a learned (77, width) offset; optional caption dropout.

    Caption dropout draws from the global torch generator, so a resumed run only continues the
    same curve if that generator's state was restored. Every batch's indices and the dtype of
    every prediction are recorded.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, caption_dropout: float = 0.0, tokens: int = 77) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False)
        self.caption_dropout = caption_dropout
        self.offset = nn.Parameter(torch.zeros(tokens, text_encoder.config.hidden_size))
        self.seen_indices: list[int] = []
        self.prediction_dtypes: set[str] = set()

    def settings(self) -> dict:
        return {"caption_dropout": self.caption_dropout}

    def forward(self, unet: nn.Module, conditioner, batch: TrainingBatch, noisy_latents: torch.Tensor, timesteps: torch.Tensor):
        prediction = super().forward(unet, conditioner, batch, noisy_latents, timesteps)
        self.prediction_dtypes.add(str(prediction.dtype))
        return prediction

    def encoder_hidden_states(self, batch: TrainingBatch, timesteps: torch.Tensor) -> torch.Tensor:
        self.seen_indices += batch.indices.tolist()
        captions = list(batch.captions)
        if self.caption_dropout:
            dropped = torch.rand(len(captions)) < self.caption_dropout
            captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]
        tokens = self.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids = tokens.input_ids
        states = self.text_encoder(ids.to(self.offset.device)).last_hidden_state
        return states + nn.functional.pad(self.offset, (0, 0, 0, 77 - self.offset.shape[0]))


def ddp_config(output_dir: Path, train_batch_size: int, mixed_precision: str = "no") -> TrainingConfig:
    """Four samples per optimizer step in two accumulation micro-batches, however many processes."""
    return TrainingConfig(
        output_dir=output_dir,
        max_train_steps=2,
        train_batch_size=train_batch_size,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        checkpointing_steps=2,
        seed=7,
        mixed_precision=mixed_precision,
        show_progress=False,
    )


def main(out_dir: Path, mixed_precision: str) -> None:
    components = tiny_sd_components(0)
    method = CaptionOffset(components["tokenizer"], components["text_encoder"])
    rank = int(os.environ.get("RANK", "0"))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    result = train(
        method,
        components["unet"],
        components["vae"],
        components["scheduler"],
        colour_dataset(),
        ddp_config(out_dir / "run", train_batch_size=4 // (2 * processes), mixed_precision=mixed_precision),
    )
    save_file({"offset": method.offset.detach().contiguous()}, out_dir / f"rank{rank}.safetensors")
    report = {
        "indices": method.seen_indices,
        "losses": result.losses,
        "last_step": result.last_step,
        "prediction_dtypes": sorted(method.prediction_dtypes),
        "trainable_dtype": str(method.offset.dtype),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    if "--condkit" in sys.argv:
        from condkit.cli import main as condkit_main

        sys.exit(condkit_main(sys.argv[sys.argv.index("--condkit") + 1 :]))
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mixed-precision", default="no")
    arguments = parser.parse_args()
    main(arguments.out_dir, arguments.mixed_precision)
