"""An image depends only on its own prompt: the shipped model, a short prompt batched with a 129-token one.

    python benchmarks/batch_independence.py

Generates the three requests together (batch size 4) and each alone, with CLIP and Long-CLIP, and
prints the largest pixel difference (0-255) between an image made in the batch and made alone.
"""

import numpy as np
import torch

import condkit
from condkit.verbosity import disable_progress_bars

SHORT = "a red circle to the left of a blue square"
LONG = SHORT + ", " + ", ".join(["with a small green triangle above a big yellow star"] * 9)


def main() -> None:
    torch.set_num_threads(2)
    disable_progress_bars()
    pipe = condkit.load_pipeline()
    settings = condkit.GenerationSettings(steps=25, guidance=7.5, batch_size=4)
    requests = [condkit.PromptRequest(SHORT, seed=0), condkit.PromptRequest(LONG, seed=1), condkit.PromptRequest(SHORT, seed=2)]
    for name in ("clip", "long-clip"):
        conditioner = condkit.load_conditioner(name, pipe)
        together = condkit.generate(pipe, conditioner, requests, settings)
        worst = 0
        for request, image in zip(requests, together):
            alone = condkit.generate(pipe, conditioner, [request], settings)[0]
            worst = max(worst, int(np.abs(np.asarray(image.image, dtype=int) - np.asarray(alone.image, dtype=int)).max()))
        tokens = len(pipe.tokenizer(LONG).input_ids)
        print(f"{name:10s} a {tokens}-token prompt in the batch: max |batched - alone| = {worst} (goal 0)")


if __name__ == "__main__":
    main()
