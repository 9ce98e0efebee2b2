"""An image depends only on its own prompt: the shipped model, a short prompt batched with a 129-token one.

    python benchmarks/batch_independence.py

Generates the three requests together (batch size 4), with CLIP and Long-CLIP, and prints the
largest pixel difference (0-255) of each image against (a) the same image with other batch-mates
(another short prompt, and a 3-chunk prompt instead of the 2-chunk one): goal 0; (b) the image
made alone, in a batch of one, where the denoiser's kernels may round differently.
"""

import numpy as np
import torch

import condkit
from condkit.verbosity import disable_progress_bars

SHORT = "a red circle to the left of a blue square"
LONG = SHORT + ", " + ", ".join(["with a small green triangle above a big yellow star"] * 9)

LONGER = LONG + ", " + ", ".join(["with a big pink cross below a cyan diamond"] * 8)
OTHER = "a green triangle above a yellow star"


def difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def main() -> None:
    torch.set_num_threads(2)
    disable_progress_bars()
    pipe = condkit.load_pipeline()
    settings = condkit.GenerationSettings(steps=25, guidance=7.5, batch_size=4)
    requests = [condkit.PromptRequest(SHORT, seed=0), condkit.PromptRequest(LONG, seed=1), condkit.PromptRequest(SHORT, seed=2)]
    for name in ("clip", "long-clip"):
        conditioner = condkit.load_conditioner(name, pipe)
        together = condkit.generate(pipe, conditioner, requests, settings)
        mates = condkit.generate(pipe, conditioner, [requests[0], condkit.PromptRequest(LONGER, seed=7), condkit.PromptRequest(OTHER, seed=8)], settings)
        other_mates = difference(together[0].image, mates[0].image)
        alone = max(difference(image.image, condkit.generate(pipe, conditioner, [request], settings)[0].image)
                    for request, image in zip(requests, together))
        tokens = len(pipe.tokenizer(LONG).input_ids)
        print(f"{name:10s} with a {tokens}-token prompt in the batch: max |batched - other batch-mates| = {other_mates} (goal 0), "
              f"max |batched - alone| = {alone}")


if __name__ == "__main__":
    main()
