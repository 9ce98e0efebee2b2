"""Teach the embedded model a new word for one object, then use it in new scenes (offline, CPU).

    python samples/textual_inversion.py            # ~2 min on 2 cores; writes outputs/textual-inversion.png

Swap `concept_images(...)` for a folder of your own pictures (folder_dataset("my_photos/",
caption_required=False); a same-name .txt caption that contains the placeholder is used as
written) and `load_pipeline()` for a hub model to do the same on Stable Diffusion.
"""

import os
import tempfile

import torch

from condkit import load_pipeline
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embeddings import load_embedding
from condkit.pipelines.generate import image_grid
from condkit.shapes_world.concepts import concept_images, save_concept_images
from condkit.training.data import folder_dataset
from condkit.training.loop import TrainingConfig, train
from condkit.training.textual_inversion import TextualInversion

STEPS = int(os.environ.get("STEPS", 300))
run_dir = tempfile.mkdtemp(prefix="condkit-ti-")
images = folder_dataset(save_concept_images(concept_images("large", "orange", "diamond"), f"{run_dir}/images"),
                        caption_required=False)  # no captions: the method's templates

pipe = load_pipeline()
clip = CLIPConditioner.from_pipeline(pipe)
method = TextualInversion(clip, "<thing>", initializer="object", num_vectors=1)
config = TrainingConfig(output_dir=run_dir, max_train_steps=STEPS, train_batch_size=4, learning_rate=5e-3)
train(method, pipe.unet, pipe.vae, pipe.scheduler, images, config, conditioner=clip)
embedding_file = method.save_embedding(f"{run_dir}/learned_embeds.safetensors")[0]

fresh = load_pipeline()  # any pipeline with the same text encoder takes the file
load_embedding(fresh, embedding_file)
conditioner = CLIPConditioner.from_pipeline(fresh)
prompts = ["a picture of <thing>", "<thing> to the left of a blue square", "<thing> on a yellow background"]
grid = []
for prompt in prompts:
    with torch.no_grad():
        cond = conditioner.encode(prompt, num_images_per_prompt=4)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    grid += fresh(**cond.kwargs(), num_inference_steps=25, guidance_scale=5.0, generator=generators).images
os.makedirs("outputs", exist_ok=True)
image_grid(grid, columns=4).save("outputs/textual-inversion.png")
print(f"embedding: {embedding_file}\nrows of outputs/textual-inversion.png:", *prompts, sep="\n  ")
