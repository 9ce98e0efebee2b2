"""Conditioners: Conditioning, Conditioner, the registry, prompt syntax, chunking, embedding files.

This package knows nothing of pipelines/, training/ or the shapes world.
"""

CLIP_POSITIONS = 77  # stock CLIP's position table (its token window); SD's UNet was trained to attend over this many
