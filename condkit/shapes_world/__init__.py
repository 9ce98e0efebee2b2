"""The embedded shapes world, beside the library: scenes, captions, scorer, prompt sets, evaluation,
datasets, the training recipe, and `MODEL_DIR`, the shipped pipeline folder.

It may use condkit's conditioning/, pipelines/ and training/; nothing in them imports it.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"  # the shipped StableDiffusionPipeline folder
