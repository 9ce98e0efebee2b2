"""Textual inversion with CoRe's context regularization, then CoRe's test-time refinement for one prompt.

    python samples/core_personalization.py         # ~4 min on 2 cores; writes outputs/core.png

CoRe keeps the new word behaving like its category word ("object" here) inside other prompts, so
prompts that recompose the concept hold together better than with plain textual inversion.
"""

import os
import tempfile

import torch

from condkit import load_pipeline
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embeddings import load_embedding
from condkit.pipelines.generate import image_grid
from condkit.shapes_world.concepts import concept_images, save_concept_images
from condkit.training.core import CoRe, test_time_optimize
from condkit.training.data import folder_dataset
from condkit.training.loop import TrainingConfig, train

STEPS = int(os.environ.get("STEPS", 300))
PROMPT = "<thing> to the left of a blue square"
run_dir = tempfile.mkdtemp(prefix="condkit-core-")
images = folder_dataset(save_concept_images(concept_images("large", "orange", "diamond"), f"{run_dir}/images"),
                        caption_required=False)  # no captions: the method's templates

pipe = load_pipeline()
clip = CLIPConditioner.from_pipeline(pipe)
method = CoRe(clip, "<thing>", initializer="object", num_vectors=1)  # the paper's λ and norm window
config = TrainingConfig(output_dir=run_dir, max_train_steps=STEPS, train_batch_size=4, learning_rate=5e-3)
train(method, pipe.unet, pipe.vae, pipe.scheduler, images, config, conditioner=clip)
trained_file = method.save_embedding(f"{run_dir}/learned_embeds.safetensors")[0]
adjusted = test_time_optimize(method, pipe, PROMPT)  # 10 steps on the regularizers alone, no images
print(f"test-time regularization loss {adjusted.initial_loss:.4g} -> {adjusted.final_loss:.4g}")

grid = []
for embedding in (trained_file, adjusted.embedding):
    fresh = load_pipeline()
    load_embedding(fresh, embedding)
    with torch.no_grad():
        cond = CLIPConditioner.from_pipeline(fresh).encode(PROMPT, num_images_per_prompt=4)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    grid += fresh(**cond.kwargs(), num_inference_steps=25, guidance_scale=5.0, generator=generators).images
os.makedirs("outputs", exist_ok=True)
image_grid(grid, columns=4).save("outputs/core.png")
print(f"outputs/core.png: {PROMPT!r}, CoRe token (top row), after test-time refinement (bottom row)")
