"""The data layer every trainer reads (folders with sidecar captions or metadata.jsonl, anything `datasets`
loads), its one-line refusals, captions in textual inversion / CoRe, and the shapes-world export that
trains to bit-identical weights."""

from __future__ import annotations

import json
import logging
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from condkit.conditioning.projection import ProjectedConditioner
from condkit.shapes_world.dataset import adapter_dataset
from condkit.shapes_world.export import export_dataset
from condkit.training.adapters import ProjectionTraining
from condkit.training.core import CoRe
from condkit.training.data import TrainingData, folder_dataset, hub_dataset, load_training_data
from condkit.training.image_folder import ImageFolder
from condkit.training.loop import TrainingConfig, train
from condkit.training.method import TrainingBatch
from condkit.training.textual_inversion import TextualInversion
from training_helpers import clip, train_with_clip
from tiny_models import tiny_sd_pipeline



@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A datasets cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def colour(index: int) -> tuple[int, int, int]:
    return (40 * index % 256, 255 - 30 * index % 256, 90)


def save_image(path, index: int, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(index)).save(path)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def kohya_folder(root):
    """b.png (.txt), a.jpg (.caption), sub/c.png (.txt), d.png (none), hidden ones that do not count."""
    save_image(root / "b.png", 1)
    (root / "b.txt").write_text("  a blue <c>\n")
    save_image(root / "a.jpg", 0)
    (root / "a.caption").write_text("an apple")
    save_image(root / "sub" / "c.png", 2)
    (root / "sub" / "c.txt").write_text("a cat")
    save_image(root / "d.png", 3)
    save_image(root / ".hidden.png", 4)
    save_image(root / ".cache" / "e.png", 5)
    return root


def metadata_folder(root, column: str = "text", lines: list[dict] | None = None):
    for index in range(3):
        save_image(root / f"{index}.png", index)
    lines = lines if lines is not None else [{"file_name": f"{i}.png", column: f"caption {i}"} for i in (2, 0, 1)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


# Sources


def test_kohya_folder_reads_sidecar_captions_in_sorted_order(tmp_path):
    folder = kohya_folder(tmp_path / "data")
    data = folder_dataset(folder, caption_required=False)
    assert isinstance(data, TrainingData) and len(data) == 4
    assert data.names == [str(folder / name) for name in ("a.jpg", "b.png", "d.png", "sub/c.png")]
    assert data.captions == ["an apple", "a blue <c>", "", "a cat"] and data.captioned == 3
    item = data[1]
    assert set(item) == {"image", "caption"} and item["image"].mode == "RGB" and item["caption"] == "a blue <c>"
    assert pixels(item["image"])[0, 0].tolist() == list(colour(1))
    assert "4 images" in data.summary() and "3 with captions" in data.summary()
    # The compatibility name reads the same folder the same way.
    assert ImageFolder(folder).captions == data.captions and ImageFolder(folder, caption="x").captions[2] == "x"


def test_metadata_jsonl_folder_with_its_caption_column(tmp_path, caplog):
    folder = metadata_folder(tmp_path / "data", column="prompt")
    save_image(folder / "unlisted.png", 7)
    (folder / "0.txt").write_text("ignored: metadata.jsonl wins")
    with caplog.at_level(logging.WARNING, logger="condkit"):
        data = folder_dataset(folder, caption_column="prompt")
    assert data.captions == ["caption 0", "caption 1", "caption 2"]  # sorted by file name, not by line
    assert [pixels(data[i]["image"])[0, 0].tolist() for i in range(3)] == [list(colour(i)) for i in range(3)]
    assert "1 images" in caplog.text and "not listed in metadata.jsonl" in caplog.text


def test_hub_dataset_reads_an_image_folder_and_save_to_disk_alike(tmp_path):
    folder = metadata_folder(tmp_path / "imagefolder")
    from_folder = hub_dataset(folder)
    assert len(from_folder) == 3 and sorted(from_folder.captions) == ["caption 0", "caption 1", "caption 2"]

    table = datasets.Dataset.from_dict(
        {"picture": [str(folder / f"{i}.png") for i in range(3)], "prompt": ["p0", "p1", None]},
        features=datasets.Features(picture=datasets.Image(), prompt=datasets.Value("string")),
    )
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "validation": table.select([2])}).save_to_disk(str(tmp_path / "saved_dict"))
    saved = hub_dataset(tmp_path / "saved", image_column="picture", caption_column="prompt", caption_required=False)
    assert saved.captions == ["p0", "p1", ""] and saved.names[0].startswith("row 0 of dataset")
    assert [pixels(saved[i]["image"])[0, 0].tolist() for i in range(3)] == [list(colour(i)) for i in range(3)]
    split = hub_dataset(tmp_path / "saved_dict", "picture", "prompt", split="validation", caption_required=False)
    assert len(split) == 1 and pixels(split[0]["image"])[0, 0].tolist() == list(colour(2))
    first_two = hub_dataset(tmp_path / "saved", "picture", "prompt", max_items=2)
    assert first_two.captions == ["p0", "p1"]


def test_streaming_reads_the_first_max_items_rows(tmp_path):
    folder = metadata_folder(tmp_path / "imagefolder")
    whole = hub_dataset(folder)
    streamed = hub_dataset(folder, streaming=True, max_items=2)
    assert len(streamed) == 2 and streamed.captions == whole.captions[:2]
    for index in range(2):
        assert np.array_equal(pixels(streamed[index]["image"]), pixels(whole[index]["image"]))
    with pytest.raises(ValueError, match="streaming needs max_items") as error:
        hub_dataset(folder, streaming=True)
    one_line(error)


def test_load_training_data_chooses_the_source(tmp_path):
    folder = metadata_folder(tmp_path / "data")
    assert load_training_data(data=folder).captions == ["caption 0", "caption 1", "caption 2"]
    assert sorted(load_training_data(dataset=folder).captions) == ["caption 0", "caption 1", "caption 2"]
    assert len(load_training_data(dataset=folder, image_column="image", caption_column="text", max_items=1)) == 1
    for arguments, message in [
        ({}, "got neither"),
        ({"data": folder, "dataset": folder}, "got both"),
        ({"data": folder, "image_column": "image"}, "image_column applies to a dataset only"),
        ({"data": folder, "streaming": True, "max_items": 2}, "streaming, max_items apply to a dataset only"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            load_training_data(**arguments)
        one_line(error)


# Bad input: one line each, naming the value and what was expected


def test_a_folder_without_images_or_that_is_not_there(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures")
    with pytest.raises(ValueError, match=r"no images found in '.*empty'; expected files ending in \.png") as error:
        load_training_data(data=empty, caption_required=False)
    one_line(error)
    with pytest.raises(FileNotFoundError, match="image folder '.*nowhere' does not exist"):
        folder_dataset(tmp_path / "nowhere")


def test_an_image_without_a_caption_is_named_where_captions_are_required(tmp_path):
    folder = kohya_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"image '.*d\.png' has no caption; captions are required") as error:
        folder_dataset(folder)
    one_line(error)
    (folder / "d.txt").write_text("a dog")
    (folder / "d.caption").write_text("a dog again")
    with pytest.raises(ValueError, match=r"has two caption files \(d\.txt, d\.caption\)"):
        folder_dataset(folder)


@pytest.mark.parametrize("line,message", [
    ({"file_name": "1.png"}, r"metadata\.jsonl' line 2 has no 'text' \(the caption column\) for '1\.png'"),
    ({"text": "x"}, r"metadata\.jsonl' line 2 has no 'file_name'"),
    ({"file_name": "9.png", "text": "x"}, r"metadata\.jsonl' line 2: file_name '9\.png' does not exist"),
    ({"file_name": "0.png", "text": "x"}, r"line 2: file_name '0\.png' is listed again \(first on line 1\)"),
    ({"file_name": "../0.png", "text": "x"}, r"line 2: file_name '\.\./0\.png' is outside the folder"),
    ({"file_name": "1.png", "text": 3}, r"caption in '.*metadata\.jsonl' line 2 \('text'\) is a int; expected a string"),
])
def test_bad_metadata_lines_are_named_by_file_and_line(tmp_path, line, message):
    lines = [{"file_name": "0.png", "text": "zero"}, line, {"file_name": "2.png", "text": "two"}]
    folder = metadata_folder(tmp_path / "data", lines=lines)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        folder_dataset(folder)
    one_line(error)


def test_a_metadata_line_that_is_not_json(tmp_path):
    folder = metadata_folder(tmp_path / "data")
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a"}\n{"file_name": \n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl' line 2 is not valid JSON") as error:
        folder_dataset(folder)
    one_line(error)


def test_a_caption_column_that_does_not_exist_lists_the_columns(tmp_path):
    folder = metadata_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"caption column 'prompt' is not in '.*metadata\.jsonl'; its columns are: file_name, text"):
        folder_dataset(folder, caption_column="prompt")
    with pytest.raises(ValueError, match=r"caption column 'prompt' is not in dataset .*; its columns are: image, text") as error:
        hub_dataset(folder, caption_column="prompt")
    one_line(error)
    with pytest.raises(ValueError, match=r"image column 'picture' is not in dataset .*; its columns are: image, text"):
        hub_dataset(folder, image_column="picture")
    # Without captions required and no column named, a dataset without "text" simply has no captions.
    (folder / "metadata.jsonl").unlink()
    assert hub_dataset(folder, caption_required=False).captioned == 0
    with pytest.raises(ValueError, match=r"caption column 'text' is not in dataset .*; its columns are: image"):
        hub_dataset(folder)


def test_a_dataset_that_cannot_load_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"cannot load dataset 'someone/no-such-dataset' as a hub name") as error:
        load_training_data(dataset="someone/no-such-dataset")
    assert time.perf_counter() - start < 10
    one_line(error)
    with pytest.raises(FileNotFoundError, match=r"dataset folder '/no/such/folder' does not exist"):
        hub_dataset("/no/such/folder")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [None]})}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"dataset '.*saved' has no split 'test'; its splits are: train"):
        hub_dataset(tmp_path / "saved", split="test")


def test_unreadable_images_fail_by_name_or_are_skipped_with_a_warning(tmp_path, caplog):
    folder = kohya_folder(tmp_path / "data")
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image '.*broken\.png': ") as error:
        folder_dataset(folder, caption_required=False)
    one_line(error)
    with caplog.at_level(logging.WARNING, logger="condkit"):
        data = folder_dataset(folder, caption_required=False, skip_unreadable=True)
    assert len(data) == 4 and data.skipped == [str(folder / "broken.png")] and "broken.png" not in " ".join(data.names)
    assert "skipped 1 unreadable images of 5" in caplog.text and "broken.png" in caplog.text
    # Without the up-front check, the image is named when training reaches it.
    lazy = folder_dataset(folder, caption_required=False, check_images=False)
    with pytest.raises(ValueError, match=r"cannot read image '.*broken\.png'"):
        lazy[lazy.names.index(str(folder / "broken.png"))]

    imagefolder = metadata_folder(tmp_path / "imagefolder")
    (imagefolder / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"cannot read image row \d of dataset '.*imagefolder' \(split 'train'\) \('.*1\.png'\): ") as error:
        hub_dataset(imagefolder)
    one_line(error)
    assert sorted(hub_dataset(imagefolder, skip_unreadable=True).captions) == ["caption 0", "caption 2"]


# Captions in textual inversion and CoRe


def batch_of(captions: list[str], step: int = 5) -> TrainingBatch:
    return TrainingBatch(indices=torch.arange(len(captions)), captions=captions, latents=None, noise=None, step=step,
                         image_size=(32, 32))


@pytest.mark.parametrize("method_class", [TextualInversion, CoRe])
def test_captions_with_the_placeholder_are_used_as_written(method_class, caplog):
    pipe = tiny_sd_pipeline()
    method = method_class(clip(pipe), "<c>", "red", num_vectors=2, seed=3)
    captions = ["a photo of <c> on grass", "", "a red square", "<c>"]
    with caplog.at_level(logging.WARNING, logger="condkit"):
        prompts = method.prompts_for(batch_of(captions))
        method.prompts_for(batch_of(captions, step=6))
    templates = method.prompts_for(batch_of([""] * 4))  # what every image got before captions were read
    assert prompts[0] == captions[0] and prompts[3] == "<c>"
    assert prompts[1] == templates[1] and prompts[2] == templates[2] and "<c> <c>_1" in prompts[2]
    assert caplog.text.count("captions without the placeholder '<c>' are not used") == 1
    # Drawn only from (seed, step, index, caption): a fresh method, e.g. after a resume, draws the same.
    again = method_class(clip(tiny_sd_pipeline()), "<c>", "red", num_vectors=2, seed=3)
    assert again.prompts_for(batch_of(captions)) == prompts
    assert [method.uses_caption(c) for c in captions] == [True, False, False, True]
    # As written: the conditioner expands the multi-vector placeholder itself, as at inference.
    conditioner = clip(pipe)
    written = conditioner.embed(["a photo of <c> on grass"]).prompt_embeds
    assert torch.equal(written, conditioner.embed(["a photo of <c> <c>_1 on grass"]).prompt_embeds)


def test_textual_inversion_trains_on_a_captioned_folder(tmp_path):
    folder = tmp_path / "data"
    for index in range(2):
        save_image(folder / f"{index}.png", index, size=(32, 32))
    (folder / "0.txt").write_text("a <c> on a table")
    pipe = tiny_sd_pipeline()
    method = TextualInversion(clip(pipe), "<c>", "red")
    seen = []
    original = method.prompts_for
    method.prompts_for = lambda batch: seen.extend(original(batch)) or original(batch)
    config = TrainingConfig(output_dir=tmp_path / "run", max_train_steps=1, train_batch_size=2, learning_rate=1e-2,
                            show_progress=False)
    train_with_clip(pipe, method, folder_dataset(folder, caption_required=False), config)
    assert "a <c> on a table" in seen and len(seen) == 2


# The shapes world as a folder dataset


def test_exported_shapes_world_matches_the_built_in_source(tmp_path):
    exported = export_dataset(tmp_path / "shapes", count=4, seed=2, resolution=32)
    built_in = adapter_dataset(4, seed=2)(32)
    data = folder_dataset(exported)
    assert sorted(p.name for p in exported.iterdir()) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                           "metadata.jsonl"]
    for index in range(4):
        assert data[index]["caption"] == built_in[index]["caption"]
        assert np.array_equal(pixels(data[index]["image"]), pixels(built_in[index]["image"]))
    assert hub_dataset(exported).captions == data.captions  # datasets' imagefolder reads it too
    with pytest.raises(FileExistsError, match="is not empty"):
        export_dataset(exported, count=1)
    assert export_dataset(exported, count=1, overwrite=True) == exported and len(folder_dataset(exported)) == 1
    with pytest.raises(ValueError, match="count must be an integer of at least 1, got 0"):
        export_dataset(tmp_path / "none", count=0)
    assert not (tmp_path / "none").exists()


def test_training_from_the_export_gives_bit_identical_weights(tmp_path):
    def trained(dataset, name):
        pipe = tiny_sd_pipeline()
        torch.manual_seed(0)
        conditioner = ProjectedConditioner.from_pipeline(pipe, "wiclp", switch_off_timestep=300)
        method = ProjectionTraining(conditioner.projection)
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        data = dataset(resolution) if callable(dataset) else dataset
        config = TrainingConfig(output_dir=tmp_path / name, max_train_steps=2, train_batch_size=2, learning_rate=1e-2,
                                resolution=resolution, show_progress=False, seed=7)
        train(method, pipe.unet, pipe.vae, pipe.scheduler, data, config, conditioner=conditioner)
        return resolution, {key: value.clone() for key, value in conditioner.projection.state_dict().items()}

    resolution, from_world = trained(adapter_dataset(6, seed=7), "world")
    folder = export_dataset(tmp_path / "shapes", count=6, seed=7, resolution=resolution)
    _, from_folder = trained(folder_dataset(folder), "folder")
    initial = ProjectedConditioner.from_pipeline(tiny_sd_pipeline(), "wiclp").projection.state_dict()  # zeros
    assert from_world.keys() == from_folder.keys()
    assert all(torch.equal(from_world[key], from_folder[key]) for key in from_world)
    assert any(not torch.equal(from_world[key], initial[key]) for key in from_world)  # it did train
