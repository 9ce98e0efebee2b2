"""Per-step cost of ELLA's timestep-aware connector next to an SD1.5-sized UNet step.

At inference the attached proxy runs the connector inside every UNet call, so its cost recurs at
every denoising step. This times one step at SD1.5 scale with random weights (nothing is
downloaded): a full-size UNet2DConditionModel from the SD1.5 config below, 64×64 latents, batch 2
(the CFG pair), and the connector at ELLA's default widths (66.8M parameters) reading T5-XL-sized
features (2048-d, 128 tokens). Each repeat times (connector + UNet) and (UNet alone, on the
connector's output) back to back, alternating the order; the script prints the medians and their
ratio, and the ratio of floating-point operations (counted on the meta device), which does not
depend on what else the machine is running.

    nice -n 19 python benchmarks/bench_connector_overhead.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from condkit.conditioning.ella_connector import TimestepAwareConnector

sys.path.insert(0, str(Path(__file__).parent))
from sd15_random_pipeline import SD15_UNET_CONFIG  # noqa: E402 (a sibling script)

TEXT_TOKENS = 128
TEXT_DIM = 2048  # flan-t5-xl
BATCH = 2  # negative and positive rows of classifier-free guidance


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def count_flops(unet_config: dict, batch: int) -> tuple[int, int]:
    """(connector, UNet) floating-point operations of one step, counted on shape-only meta tensors."""
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config(unet_config)
        connector = TimestepAwareConnector()
        latents = torch.randn(batch, 4, 64, 64)
        features = torch.randn(batch, TEXT_TOKENS, TEXT_DIM)
        timestep = torch.tensor(500)
        with FlopCounterMode(display=False) as connector_count:
            hidden = connector(features, timestep)
        with FlopCounterMode(display=False) as unet_count:
            unet(latents, timestep, encoder_hidden_states=hidden)
    return connector_count.get_total_flops(), unet_count.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs (at least 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.repeats < 5:
        raise ValueError(f"--repeats must be at least 5, got {args.repeats}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG).eval().to(device)
    connector = TimestepAwareConnector().eval().to(device)  # ELLA defaults: 768 wide, 64 latents, 6 blocks
    latents = torch.randn(BATCH, 4, 64, 64, device=device)
    features = torch.randn(BATCH, TEXT_TOKENS, TEXT_DIM, device=device)
    timestep = torch.tensor(500, device=device)
    unet_parameters = sum(p.numel() for p in unet.parameters())
    connector_parameters = sum(p.numel() for p in connector.parameters())
    print(f"UNet {unet_parameters / 1e6:.1f}M parameters, connector {connector_parameters / 1e6:.1f}M; "
          f"latents {tuple(latents.shape)}, text features {tuple(features.shape)}, {torch.get_num_threads()} threads")

    with torch.inference_mode():
        hidden = connector(features, timestep)

        def unet_alone() -> None:
            unet(latents, timestep, encoder_hidden_states=hidden)
            sync(device)

        def connector_and_unet() -> None:
            unet(latents, timestep, encoder_hidden_states=connector(features, timestep))
            sync(device)

        def connector_alone() -> None:
            connector(features, timestep)
            sync(device)

        unet_alone(), connector_and_unet()  # warm-up
        with_connector, without, ratios = [], [], []
        for repeat in range(args.repeats):
            pair = (connector_and_unet, unet_alone) if repeat % 2 == 0 else (unet_alone, connector_and_unet)
            times = {function: timed(function) for function in pair}
            with_connector.append(times[connector_and_unet])
            without.append(times[unet_alone])
            ratios.append(times[connector_and_unet] / times[unet_alone])
            print(f"repeat {repeat + 1}: connector+UNet {with_connector[-1]:.3f} s, UNet {without[-1]:.3f} s")
        connector_times = [timed(connector_alone) for _ in range(args.repeats)]

    median_with, median_without = statistics.median(with_connector), statistics.median(without)
    print(f"median connector+UNet step {median_with:.3f} s, UNet step {median_without:.3f} s, "
          f"connector alone {statistics.median(connector_times) * 1000:.1f} ms")
    print(f"ratio of medians {median_with / median_without:.4f}; median of per-pair ratios {statistics.median(ratios):.4f} "
          "(target <= 1.05)")
    connector_flops, unet_flops = count_flops(SD15_UNET_CONFIG, BATCH)
    print(f"FLOPs per step: connector {connector_flops / 1e9:.1f} G, UNet {unet_flops / 1e9:.1f} G, "
          f"ratio {(connector_flops + unet_flops) / unet_flops:.4f}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
