"""Sizes and augmentation: crops, flips, aspect-ratio buckets and the latents cached per view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_sd_components
from train_loop_ddp_script import CaptionOffset

from condkit.training.augment import Augmentation
from condkit.training.bucketing import bucket_sizes, nearest_bucket
from condkit.training.latent_cache import to_pixels
from condkit.training.loop import TrainingConfig, train
from condkit.training.sampling import DataOrder


def gradient_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_centre_view_is_the_old_resize_and_crop_exactly():
    image = gradient_image(50, 34)
    augmentation = Augmentation(32)
    view = augmentation.view(image.size, (32, 32))
    assert torch.equal(augmentation.pixels(image, view), to_pixels(image, 32, 0))


def test_random_crops_fall_on_the_latent_grid_and_flips_mirror():
    image = gradient_image(64, 32)
    augmentation = Augmentation(32, center_crop=False, flip=True, crop_step=8)
    views = {augmentation.view(image.size, (32, 32), np.random.default_rng(seed)) for seed in range(200)}
    lefts = sorted({view.box[0] for view in views})
    assert lefts == [0, 8, 16, 24, 32]  # every offset on the grid is drawn, none off it
    assert {view.flip for view in views} == {False, True}
    assert len(views) == 10  # so an image has a bounded number of cached latents
    view = next(v for v in views if v.flip)
    mirrored = augmentation.pixels(image, view)
    plain = augmentation.pixels(image, type(view)(view.resized, view.box, False))
    assert torch.equal(mirrored, plain.flip(-1))


def test_buckets_keep_the_area_and_the_grid():
    buckets = bucket_sizes(512, step=64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 512 * 512
        assert max(width / height, height / width) <= 4
    assert buckets[nearest_bucket((1920, 1080), buckets)][0] > buckets[nearest_bucket((1080, 1920), buckets)][0]
    assert buckets[nearest_bucket((1000, 1000), buckets)] == (512, 512)
    with pytest.raises(ValueError, match="smaller than the bucket step"):
        bucket_sizes(32, step=64)


def test_grouped_order_draws_each_step_from_one_group_and_uses_every_full_block():
    groups = [0] * 7 + [1] * 4 + [2] * 1
    order = DataOrder(len(groups), 2, seed=5, groups=groups)
    assert order.steps_per_epoch == 3 + 2
    seen = []
    for _ in range(order.steps_per_epoch):
        indices, _ = order.next_step()
        assert len({groups[i] for i in indices.tolist()}) == 1
        seen += indices.tolist()
    assert len(set(seen)) == 10 and 11 not in seen  # the lone image of group 2 never trains
    again = DataOrder(len(groups), 2, seed=5, groups=groups)
    assert [again.next_step()[0].tolist() for _ in range(5)] == [seen[i : i + 2] for i in range(0, 10, 2)]
    with pytest.raises(ValueError, match="no aspect-ratio bucket holds the 8 images"):
        DataOrder(len(groups), 8, seed=5, groups=groups)


def test_ungrouped_order_is_unchanged():
    order = DataOrder(8, 2, seed=3)
    expected = np.random.default_rng([3, 0]).permutation(8)
    assert order.next_step()[0].tolist() == expected[:2].tolist()


class ShapeRecorder(CaptionOffset):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_shapes = []
        self.micro_conditions = []

    def forward(self, unet, conditioner, batch, noisy_latents, timesteps):
        self.batch_shapes.append((tuple(batch.latents.shape), batch.image_size))
        self.micro_conditions.append((batch.indices.tolist(), batch.original_sizes, batch.crops_top_left))
        return super().forward(unet, conditioner, batch, noisy_latents, timesteps)


@pytest.fixture(scope="module")
def parts():
    return tiny_sd_components(0)


def mixed_dataset():
    """Four wide and four tall images."""
    return [(gradient_image(48, 24, i), f"wide {i}") if i % 2 else (gradient_image(24, 48, i), f"tall {i}")
            for i in range(8)]


def run(parts, folder, dataset, **changes):
    torch.manual_seed(0)
    method = ShapeRecorder(parts["tokenizer"], parts["text_encoder"])
    settings = dict(output_dir=folder, max_train_steps=4, train_batch_size=2, learning_rate=1e-2, seed=1,
                    checkpointing_steps=100, show_progress=False, resolution=16)
    config = TrainingConfig(**{**settings, **changes})
    result = train(method, parts["unet"], parts["vae"], parts["scheduler"], dataset, config)
    return result, method


def test_bucketed_batches_share_one_size_and_wide_images_stay_wide(parts, tmp_path):
    _, method = run(parts, tmp_path / "run", mixed_dataset(), aspect_ratio_bucketing=True)
    sizes = {image_size for _, image_size in method.batch_shapes}
    assert len(sizes) == 2 and {(h > w) for h, w in sizes} == {True, False}  # tall and wide buckets, no squares
    for shape, (height, width) in method.batch_shapes:
        assert shape[0] == 2 and shape[-2:] == (height // 2, width // 2)
    captions_per_step = [method.seen_indices[i : i + 2] for i in range(0, 8, 2)]
    for indices in captions_per_step:
        assert len({index % 2 for index in indices}) == 1  # a step never mixes wide and tall


def test_latents_are_cached_per_image_crop_and_flip(parts, tmp_path, monkeypatch):
    vae = parts["vae"]
    encoded = []
    original = vae.encode
    monkeypatch.setattr(vae, "encode", lambda pixels: (encoded.append(pixels.clone()), original(pixels))[1])
    dataset = [(gradient_image(24, 16, i), f"image {i}") for i in range(2)]
    run(parts, tmp_path / "run", dataset, max_train_steps=40, random_flip=True, center_crop=False)
    # 24x16 → 24x16 resized, 16x16 crops on the VAE's 2-pixel grid: 5 offsets × 2 flips per image at most
    assert len(encoded) <= 2 * 5 * 2
    distinct = {tuple(p.flatten().tolist()) for p in encoded}
    assert len(distinct) == len(encoded) > 4  # each view encoded once, and views do vary
    assert all(p.shape == (1, 3, 16, 16) for p in encoded)


def test_augmented_runs_do_not_depend_on_how_a_step_is_split(parts, tmp_path):
    options = dict(aspect_ratio_bucketing=True, random_flip=True, center_crop=False, max_train_steps=2)
    whole, whole_method = run(parts, tmp_path / "whole", mixed_dataset(), **options)
    split, split_method = run(parts, tmp_path / "split", mixed_dataset(), train_batch_size=1,
                              gradient_accumulation_steps=2, **options)
    assert split_method.seen_indices == whole_method.seen_indices
    assert split.losses == pytest.approx(whole.losses, rel=1e-5)
    assert torch.allclose(split_method.offset, whole_method.offset, atol=1e-5)


def test_bucketing_needs_a_resolution(parts, tmp_path):
    with pytest.raises(ValueError, match="bucketing needs a resolution"):
        run(parts, tmp_path / "run", mixed_dataset(), resolution=None, aspect_ratio_bucketing=True)


def test_an_augmented_run_resumes_on_the_same_curve(parts, tmp_path):
    options = dict(aspect_ratio_bucketing=True, random_flip=True, center_crop=False, checkpointing_steps=2)
    full, _ = run(parts, tmp_path / "full", mixed_dataset(), **options)
    run(parts, tmp_path / "cut", mixed_dataset(), max_train_steps=2, **options)
    resumed, _ = run(parts, tmp_path / "cut", mixed_dataset(), resume_from_checkpoint="latest", **options)
    assert resumed.first_step == 2 and resumed.losses == full.losses[2:]


def test_batches_carry_sdxl_micro_conditioning_of_their_views(parts, tmp_path):
    dataset = [(gradient_image(40, 16, i), f"image {i}") for i in range(4)]
    _, method = run(parts, tmp_path / "run", dataset, max_train_steps=6, center_crop=False)
    corners = set()
    for indices, original_sizes, crops in method.micro_conditions:
        assert original_sizes == [(16, 40)] * len(indices)  # (height, width) before resizing
        assert all(top == 0 and left % 2 == 0 and 0 <= left <= 24 for top, left in crops)
        corners |= set(crops)
    assert len(corners) > 1
    _, plain = run(parts, tmp_path / "plain", dataset, max_train_steps=1)
    assert plain.micro_conditions[0][1:] == (None, None)


def test_sdxl_time_ids_hold_original_size_crop_and_target():
    from condkit.training.unet_call import sdxl_added_conditions

    pooled = torch.zeros(2, 4)
    plain = sdxl_added_conditions(pooled, (64, 32))["time_ids"]
    assert plain.tolist() == [[64, 32, 0, 0, 64, 32]] * 2
    cropped = sdxl_added_conditions(pooled, (64, 32), [(100, 50), (80, 40)], [(8, 0), (0, 16)])["time_ids"]
    assert cropped.tolist() == [[100, 50, 8, 0, 64, 32], [80, 40, 0, 16, 64, 32]]
