"""Prompt weighting and BREAK on the embedded shapes-world model (runs offline on a CPU).

    python samples/generate_weighted.py   # writes outputs/weighted.png
"""

import os

import torch

from condkit import load_pipeline
from condkit.conditioning.clip import CLIPConditioner
from condkit.pipelines.generate import image_grid

pipe = load_pipeline()
conditioner = CLIPConditioner.from_pipeline(pipe)
prompts = [
    "a red circle to the left of a blue square",
    "a (red:1.4) circle to the left of a [blue] square",
    "a red circle BREAK a blue square",
]
images = []
for prompt in prompts:
    with torch.no_grad():
        cond = conditioner.encode(prompt, num_images_per_prompt=4)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    images += pipe(**cond.kwargs(), num_inference_steps=25, guidance_scale=5.0, generator=generators).images
os.makedirs("outputs", exist_ok=True)
image_grid(images, columns=4).save("outputs/weighted.png")
print("one row per prompt:", *prompts, sep="\n  ")
