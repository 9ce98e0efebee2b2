"""condkit's conditioning on SD3 and Flux vs the plain pipeline: identical images, and the wall-time ratio.

For each family, a pipeline of random components built from configs (no download): "tiny" (the test
components) or "mid" (wider and deeper: CLIP 256 wide, T5 512 wide, 4+ transformer blocks, 64 px images).
The plain run passes prompt strings (diffusers encodes them); the condkit run passes
`load_conditioner("clip", pipe).encode(...)` through `attach`. SD3 runs CFG with negatives; Flux runs
its negatives with true_cfg_scale (two transformer calls per step). Each round runs both in alternating
order with the same prompts, seeds and settings, encoding included in the timed region; the ratio is
condkit / plain of the same round, and the median over rounds is printed.

    python benchmarks/bench_transformer_overhead.py --size mid --pairs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from condkit import attach, load_conditioner  # noqa: E402
from tiny_transformer_models import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402

PROMPTS = ["a red circle to the left of a blue square", "a small green triangle"]
NEGATIVES = ["blurry", "dark"]


def mid_sd3_pipeline():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = tiny_sd3_pipeline()
    torch.manual_seed(1)
    clip_config = pipe.text_encoder.config
    clip_config.update({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8,
                        "projection_dim": 256})
    t5_config = pipe.text_encoder_3.config
    t5_config.update({"d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 4, "num_heads": 8})
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=64, num_attention_heads=4,
        caption_projection_dim=256, joint_attention_dim=512, pooled_projection_dim=512, out_channels=4, pos_embed_max_size=32,
    )
    components = {**pipe.components, "transformer": transformer.eval(),
                  "text_encoder": CLIPTextModelWithProjection(clip_config).eval(),
                  "text_encoder_2": CLIPTextModelWithProjection(clip_config).eval(),
                  "text_encoder_3": T5EncoderModel(t5_config).eval()}
    return StableDiffusion3Pipeline(**components)


def mid_flux_pipeline():
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = tiny_flux_pipeline()
    torch.manual_seed(1)
    clip_config = pipe.text_encoder.config
    clip_config.update({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 8})
    t5_config = pipe.text_encoder_2.config
    t5_config.update({"d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 4, "num_heads": 8})
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=[16, 24, 24],
    )
    components = {**pipe.components, "transformer": transformer.eval(), "text_encoder": CLIPTextModel(clip_config).eval(),
                  "text_encoder_2": T5EncoderModel(t5_config).eval()}
    return FluxPipeline(**components)


BUILDERS = {("sd3", "tiny"): tiny_sd3_pipeline, ("sd3", "mid"): mid_sd3_pipeline,
            ("flux", "tiny"): tiny_flux_pipeline, ("flux", "mid"): mid_flux_pipeline}


def measure(family: str, size: str, pairs: int, steps: int, max_sequence_length: int) -> None:
    pipe = BUILDERS[family, size]()
    pipe.set_progress_bar_config(disable=True)
    pixels = 32 if size == "tiny" else 64
    conditioner = load_conditioner("clip", pipe, max_sequence_length=max_sequence_length)
    cfg = {"true_cfg_scale": 2.0, "guidance_scale": 3.5} if family == "flux" else {"guidance_scale": 5.0}
    common = dict(num_inference_steps=steps, height=pixels, width=pixels, max_sequence_length=max_sequence_length,
                  output_type="np", **cfg)

    def seeds():
        return [torch.Generator().manual_seed(100 + i) for i in range(len(PROMPTS))]

    def plain():
        return pipe(prompt=PROMPTS, negative_prompt=NEGATIVES, generator=seeds(), **common).images

    def condkit():
        with attach(pipe, conditioner):
            return pipe(**conditioner.encode(PROMPTS, NEGATIVES).kwargs(), generator=seeds(), **common).images

    with torch.no_grad():
        assert np.array_equal(condkit(), plain()), f"{family}: images differ between the plain pipeline and condkit"
    times = {"plain": [], "condkit": []}
    ratios = []
    with torch.no_grad():
        for round_index in range(pairs):
            order = [("plain", plain), ("condkit", condkit)]
            for name, run in order if round_index % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            ratios.append(times["condkit"][-1] / times["plain"][-1])
    print(f"{family:4s} {size}: images identical: yes; {len(PROMPTS)} images "
          f"{pixels}px x {steps} steps, T5 {max_sequence_length} tokens, {pairs} rounds; plain median "
          f"{statistics.median(times['plain']):.3f} s, condkit median {statistics.median(times['condkit']):.3f} s, "
          f"ratio median {statistics.median(ratios):.4f} (min {min(ratios):.4f}, max {max(ratios):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--size", choices=("tiny", "mid"), default="mid")
    parser.add_argument("--families", default="sd3,flux")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-sequence-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, device cpu")
    for family in args.families.split(","):
        measure(family, args.size, args.pairs, args.steps, args.max_sequence_length)
    print("target: ratio <= 1.01")


if __name__ == "__main__":
    main()
