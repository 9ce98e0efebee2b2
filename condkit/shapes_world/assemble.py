"""Stage "assemble": put the trained parts together as a diffusers StableDiffusionPipeline.

The pipeline folder is written with save_pretrained (safetensors) and additionally holds the
full contrastive CLIPModel (text and vision towers with projections) in clip/, which
Long-CLIP fine-tuning needs; StableDiffusionPipeline.from_pretrained ignores that folder.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from condkit.files import write_folder_atomically


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The text tower of a CLIPModel as a standalone CLIPTextModel with the same weights."""
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval()


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )


def build_pipeline(
    tokenizer: CLIPTokenizer, clip: CLIPModel, vae: AutoencoderKL, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder_from_clip(clip),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipeline: StableDiffusionPipeline, clip: CLIPModel, model_dir: Path, card: str | None = None) -> Path:
    """Write the pipeline, clip/ and the model card (README.md) into `model_dir`, replacing it in one rename."""

    def write(folder: Path) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        clip.save_pretrained(folder / "clip")
        if card is not None:
            (folder / "README.md").write_text(card, encoding="utf-8")

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    write_folder_atomically(model_dir, write)
    return model_dir


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
