"""SDXL from the hub with a prompt longer than 77 tokens, clip_skip and a weighted negative.

Needs the network once (or a local copy): set MODEL to a folder to run offline.

    MODEL=stabilityai/stable-diffusion-xl-base-1.0 python samples/sdxl_long_prompt.py
"""

import os

import torch

from condkit import load_pipeline
from condkit.conditioning.clip import CLIPConditioner

pipe = load_pipeline(os.environ.get("MODEL", "stabilityai/stable-diffusion-xl-base-1.0"))
conditioner = CLIPConditioner.from_pipeline(pipe, clip_skip=1)
prompt = (
    "a quiet harbour at dawn, fishing boats with (red sails:1.2), gulls over the water, mist on the hills, "
    "BREAK a lighthouse on the left with a white and blue stripe, wet cobblestones in the foreground, "
    "warm light in the windows of the houses along the quay, reflections in the still water"
)
cond = conditioner.encode(prompt, negative_prompt="(blurry:1.3), lowres")
print("prompt_embeds", tuple(cond.prompt_embeds.shape), "pooled", tuple(cond.pooled_prompt_embeds.shape))
image = pipe(**cond.kwargs(), num_inference_steps=30, generator=torch.Generator().manual_seed(0)).images[0]
image.save("harbour.png")
