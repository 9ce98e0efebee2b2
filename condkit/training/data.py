"""Training data for every method: a folder of images with captions, or anything `datasets` loads.

    data = folder_dataset("my_photos/", caption_required=False)     # textual inversion, CoRe
    data = folder_dataset("pairs/")                                 # adapters: every image needs a caption
    data = hub_dataset("saved_with_save_to_disk/", caption_column="prompt")
    data = load_training_data(data=args.data, dataset=args.dataset, image_column=..., caption_column=...)
    train(method, pipe.unet, pipe.vae, pipe.scheduler, data, config, conditioner=conditioner)

Whatever the source, the result is a `TrainingData`: a sequence of {"image": PIL.Image (RGB),
"caption": str} items, the dataset contract of `condkit.training.loop.train`. An image without a
caption has the caption "" (the loop needs a string); `TrainingData.captioned` counts those that
have one.

Sources
- A folder (`folder_dataset`), in one of two layouts:
  * kohya: images (.png .jpg .jpeg .webp .bmp, in the folder or its subfolders) with a same-name
    `.txt` or `.caption` file holding the caption (`dog/01.png` ← `dog/01.txt`); an image with both
    is refused as ambiguous. Files and folders whose names start with "." are ignored.
  * Hugging Face imagefolder: a `metadata.jsonl` at the top of the folder, one JSON object a line
    with `file_name` (a path relative to the folder) and a caption column (`caption_column`,
    default "text"). When it is there it is the whole dataset: sidecar files are not read, and
    images it does not list are not used (a warning says how many). `metadata.csv` is not read
    here (refused; `hub_dataset` reads it).
  Items are in sorted order of their paths relative to the folder, whatever the layout.
- Anything `datasets` loads (`hub_dataset`): a folder written by `save_to_disk` (read with
  `load_from_disk`), a folder of data files (`load_dataset(path)`: an image folder with
  metadata.jsonl/csv, parquet, ...), or a hub name (needs the network, or the hub cache with
  HF_HUB_OFFLINE=1). Items are in the dataset's own row order.

Captions are stripped of surrounding whitespace; an empty one counts as missing. With
`caption_required=True` (the default; adapters and Long-CLIP need captions) an image without one is
refused, naming it; textual inversion and CoRe pass False and use their templates for such images.
`caption_column=None` means "text" if the data has such a column, else (captions not required) no
captions; a column named explicitly must exist.

Second text columns (`text_columns`, e.g. Long-CLIP's short captions): other keys of metadata.jsonl
or columns of a dataset, read as captions are (stripped; "" when a row has none) and kept in
`TrainingData.texts[column]`, item by item. A column named there must exist somewhere in the data
(refused, listing the columns there are); folders of sidecar files have no such columns.

Unreadable images: refused by default, naming the first one (ValueError). With
`skip_unreadable=True` they are left out instead, with one logged warning giving their count and
the first names (`TrainingData.skipped` lists them all). Every image is decoded once when the data
is built (`check_images=True`) so this happens before any training; the images are not kept: each
is read again when the training loop asks for it (the loop encodes each once and caches its
latents). With check_images=False the first unreadable image stops training when it is reached,
named the same way. Images are turned upright by their EXIF orientation and converted to RGB.

Streaming: the loop indexes its data and needs its length, so `streaming=True` does not stream
during training: it reads the first `max_items` rows (required with streaming) through datasets'
streaming mode and keeps them in memory, images still encoded (PNG/JPEG bytes). It serves data
that is larger than the disk but whose first `max_items` rows fit in memory.

Every refusal is one line (ValueError, or FileNotFoundError for a path that is not there), raised
when the data is built, before any training.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from condkit.conditioning.prompt_syntax import check_prompt_characters

__all__ = [
    "CAPTION_SUFFIXES",
    "DEFAULT_CAPTION_COLUMN",
    "DEFAULT_IMAGE_COLUMN",
    "IMAGE_SUFFIXES",
    "METADATA_FILE",
    "TrainingData",
    "folder_dataset",
    "hub_dataset",
    "load_training_data",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILE = "metadata.jsonl"
DEFAULT_CAPTION_COLUMN = "text"
DEFAULT_IMAGE_COLUMN = "image"
_SHOWN_NAMES = 5


@dataclass(frozen=True)
class _Entry:
    """One image: how to read it and its name in messages."""

    name: str
    read: Callable[[], Any]  # returns a path, bytes, a {"bytes", "path"} mapping or a PIL image
    is_path: bool = False  # name is a file path (quoted in messages)


class TrainingData(Sequence):
    """A sequence of {"image": PIL.Image, "caption": str} items; see the module docstring.

    source: where the data came from, for messages ("folder 'x'", "dataset 'y' (split 'train')").
    names: each item's name in messages (a path, or "row N" of a dataset).
    captions: each item's caption ("" for none). skipped: names of unreadable images left out.
    """

    def __init__(self, source: str, entries: Sequence[_Entry], captions: Sequence[str], skipped: Sequence[str] = (),
                 texts: dict[str, Sequence[str]] | None = None):
        if len(entries) != len(captions):
            raise ValueError(f"{len(entries)} images but {len(captions)} captions")
        self.source = source
        self._entries = list(entries)
        self.captions = list(captions)
        self.skipped = list(skipped)
        self.texts = {column: list(values) for column, values in (texts or {}).items()}
        for column, values in self.texts.items():
            if len(values) != len(entries):
                raise ValueError(f"{len(entries)} images but {len(values)} values of column {column!r}")

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    @property
    def captioned(self) -> int:
        """How many items have a caption."""
        return sum(1 for caption in self.captions if caption)

    def summary(self) -> str:
        """One line for a log: size, captions and what was skipped."""
        skipped = f", {len(self.skipped)} unreadable skipped" if self.skipped else ""
        return f"{len(self)} images from {self.source}, {self.captioned} with captions{skipped}"

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("TrainingData is indexed by single integers")
        entry = self._entries[index]
        return {"image": _decode(entry), "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"TrainingData({self.summary()})"


def folder_dataset(
    path: str | os.PathLike,
    *,
    caption_column: str | None = None,
    caption_required: bool = True,
    skip_unreadable: bool = False,
    check_images: bool = True,
    text_columns: Sequence[str] = (),
) -> TrainingData:
    """The images of a folder with their captions (kohya sidecar files or metadata.jsonl); see the module docstring.

    caption_column: the metadata.jsonl key holding captions (None: "text"); not used with sidecar files.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder; expected a folder of images with captions")
    metadata = folder / METADATA_FILE
    images = _images_under(folder)
    texts: dict[str, list[str]] = {}
    if metadata.is_file():
        relative, captions, texts = _read_metadata(folder, metadata, caption_column, caption_required, text_columns)
        unlisted = len(set(images) - set(relative))
        if unlisted:
            logger.warning("%d images in %r are not listed in %s and are not used", unlisted, str(folder), METADATA_FILE)
    else:
        if (folder / "metadata.csv").is_file():
            raise ValueError(
                f"{str(folder / 'metadata.csv')!r} is not read by folder datasets; write the captions to "
                f"{METADATA_FILE} or load the folder as a dataset (datasets' imagefolder reads metadata.csv)"
            )
        for column in (caption_column, *text_columns):
            if column is not None:
                raise ValueError(
                    f"column {column!r} was given but {str(folder)!r} has no {METADATA_FILE}; "
                    f"captions there come from same-name {' or '.join(CAPTION_SUFFIXES)} files"
                )
        relative = images
        captions = [_read_sidecar(folder, name) for name in relative]
    if not relative:
        raise ValueError(
            f"no images found in {str(folder)!r}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            + (f" listed in {METADATA_FILE}" if metadata.is_file() else "")
        )
    order = sorted(range(len(relative)), key=lambda i: relative[i])
    entries = [_path_entry(folder / relative[i]) for i in order]
    captions = [captions[i] for i in order]
    texts = {column: [values[i] for i in order] for column, values in texts.items()}
    if caption_required:
        _require_captions(entries, captions, f"same-name {' or '.join(CAPTION_SUFFIXES)} files or {METADATA_FILE}")
    return _checked(TrainingData(f"folder {str(folder)!r}", entries, captions, texts=texts), skip_unreadable, check_images)


def hub_dataset(
    name_or_path: str | os.PathLike,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    caption_column: str | None = None,
    split: str = "train",
    streaming: bool = False,
    max_items: int | None = None,
    *,
    caption_required: bool = True,
    skip_unreadable: bool = False,
    check_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
    text_columns: Sequence[str] = (),
) -> TrainingData:
    """Rows of a dataset `datasets` loads; see the module docstring.

    max_items: use only the first max_items rows; required with streaming (those rows are read into memory).
    A folder written by save_to_disk is memory-mapped already; with it, streaming only means max_items is required.
    """
    if max_items is not None and (not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1):
        raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
    if streaming and max_items is None:
        raise ValueError(
            "streaming needs max_items (--max-items N on the command line): training indexes its data and needs its length, so the first max_items rows "
            "are read (through streaming) and kept in memory, images still encoded"
        )
    loaded, source = _load_dataset(name_or_path, split, streaming, cache_dir)
    columns = _column_names(loaded)
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} is not in {source}; its columns are: {', '.join(columns)}")
    caption_column = _caption_column(caption_column, columns, caption_required, source)
    for column in text_columns:
        if column not in columns:
            raise ValueError(f"column {column!r} is not in {source}; its columns are: {', '.join(columns)}")
    loaded = _undecoded(loaded, image_column)
    if _is_iterable(loaded):
        wanted = list(dict.fromkeys(c for c in (image_column, caption_column, *text_columns) if c))
        rows = list(loaded.select_columns(wanted).take(max_items))
        images: Sequence[Any] = [row[image_column] for row in rows]
        raw_captions = [row[caption_column] if caption_column else None for row in rows]
        raw_texts = {column: [row[column] for row in rows] for column in text_columns}
        entries = [_Entry(f"row {row} of {source}", _constant(image)) for row, image in enumerate(images)]
    else:
        if max_items is not None and max_items < len(loaded):
            loaded = loaded.select(range(max_items))
        raw_captions = list(loaded[caption_column]) if caption_column else [None] * len(loaded)
        raw_texts = {column: list(loaded[column]) for column in text_columns}
        table = loaded.select_columns([image_column])
        entries = [_Entry(f"row {row} of {source}", _row_reader(table, image_column, row)) for row in range(len(table))]
    if not entries:
        raise ValueError(f"{source} has no rows; expected images in column {image_column!r}")
    captions = [_caption_value(value, f"row {row} of {source} (column {caption_column!r})")
                for row, value in enumerate(raw_captions)]
    texts = {column: [_caption_value(value, f"row {row} of {source} (column {column!r})") for row, value in enumerate(values)]
             for column, values in raw_texts.items()}
    if caption_required:
        _require_captions(entries, captions, f"column {caption_column!r}")
    return _checked(TrainingData(source, entries, captions, texts=texts), skip_unreadable, check_images)


def load_training_data(
    data: str | os.PathLike | None = None,
    dataset: str | os.PathLike | None = None,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
    streaming: bool = False,
    max_items: int | None = None,
    caption_required: bool = True,
    skip_unreadable: bool = False,
    check_images: bool = True,
    text_columns: Sequence[str] = (),
) -> TrainingData:
    """The training data from exactly one of `data` (a folder: `folder_dataset`) or `dataset` (`hub_dataset`).

    image_column, split, streaming and max_items apply to `dataset` only (refused with `data`);
    caption_column applies to both (with `data`, the metadata.jsonl key).
    """
    if (data is None) == (dataset is None):
        raise ValueError(
            "expected exactly one source of training data: a folder (data) or a dataset name or path (dataset), "
            f"got {'both' if data is not None else 'neither'}"
        )
    common = dict(caption_column=caption_column, caption_required=caption_required, skip_unreadable=skip_unreadable,
                  check_images=check_images, text_columns=tuple(text_columns))
    if data is not None:
        given = {"image_column": image_column, "split": split if split != "train" else None,
                 "streaming": streaming or None, "max_items": max_items}
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            verb = "applies" if len(extra) == 1 else "apply"
            raise ValueError(f"{', '.join(extra)} {verb} to a dataset only, not to a folder of images ({str(data)!r})")
        return folder_dataset(data, **common)
    return hub_dataset(dataset, image_column or DEFAULT_IMAGE_COLUMN, split=split, streaming=streaming,
                       max_items=max_items, **common)


# Folders


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _images_under(folder: Path) -> list[str]:
    """Posix paths, relative to the folder, of every image in it or its subfolders (hidden ones aside)."""
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def _read_sidecar(folder: Path, relative: str) -> str:
    image = folder / relative
    found = [image.with_suffix(suffix) for suffix in CAPTION_SUFFIXES if image.with_suffix(suffix).is_file()]
    if not found:
        return ""
    if len(found) > 1:
        raise ValueError(f"image {str(image)!r} has two caption files ({', '.join(p.name for p in found)}); keep one")
    try:
        text = found[0].read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"caption file {str(found[0])!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ValueError(f"cannot read caption file {str(found[0])!r}: {error.strerror or error}") from None
    return _caption_value(text, f"caption file {str(found[0])!r}")


def _read_metadata(
    folder: Path, metadata: Path, caption_column: str | None, caption_required: bool, text_columns: Sequence[str] = ()
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(file names, captions, other text columns) of the metadata.jsonl lines, checked line by line."""
    try:
        lines = metadata.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(metadata)!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{str(metadata)!r} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a JSON {type(record).__name__}; expected an object with 'file_name'")
        if not isinstance(record.get("file_name"), str) or not record["file_name"]:
            raise ValueError(f"{where} has no 'file_name' (a path relative to the folder); its keys: {_keys(record)}")
        records.append((number, record))
    column = caption_column or DEFAULT_CAPTION_COLUMN
    keys = sorted({key for _, record in records for key in record})
    if records and not any(column in record for _, record in records):
        if caption_column is not None or caption_required:
            raise ValueError(
                f"caption column {column!r} is not in {str(metadata)!r}; its columns are: {', '.join(keys)}"
            )
        column = None
    for extra in text_columns:
        if records and not any(extra in record for _, record in records):
            raise ValueError(f"column {extra!r} is not in {str(metadata)!r}; its columns are: {', '.join(keys)}")
    texts: dict[str, list[str]] = {extra: [] for extra in text_columns}
    names: list[str] = []
    captions: list[str] = []
    seen: dict[str, int] = {}
    root = folder.resolve()
    for number, record in records:
        where = f"{str(metadata)!r} line {number}"
        name = Path(record["file_name"]).as_posix()
        target = (folder / name).resolve()
        if Path(name).is_absolute() or (target != root and root not in target.parents):
            raise ValueError(f"{where}: file_name {name!r} is outside the folder; expected a path relative to it")
        if name in seen:
            raise ValueError(f"{where}: file_name {name!r} is listed again (first on line {seen[name]})")
        seen[name] = number
        if not target.is_file():
            raise FileNotFoundError(f"{where}: file_name {name!r} does not exist in {str(folder)!r}")
        if column is not None and column not in record:
            raise ValueError(
                f"{where} has no {column!r} (the caption column) for {name!r}; every line needs one; its keys: {_keys(record)}"
            )
        names.append(name)
        captions.append(_caption_value(record.get(column) if column else None, f"{where} ({column!r})"))
        for extra in text_columns:
            texts[extra].append(_caption_value(record.get(extra), f"{where} ({extra!r})"))
    return names, captions, texts


def _keys(record: dict[str, Any]) -> str:
    return ", ".join(sorted(record)) or "none"


def _path_entry(path: Path) -> _Entry:
    return _Entry(str(path), _constant(path), is_path=True)


# Datasets


def _load_dataset(name_or_path: str | os.PathLike, split: str, streaming: bool, cache_dir: Any) -> tuple[Any, str]:
    try:
        import datasets
    except ImportError:
        raise ImportError("loading a dataset needs the datasets package: pip install datasets") from None
    name = str(name_or_path)
    path = Path(name).expanduser()
    source = f"dataset {name!r} (split {split!r})"
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # noqa: BLE001 - any failure is one line for the user
            raise ValueError(f"cannot load dataset {name!r} saved with save_to_disk: {_first_line(error)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"dataset {name!r} has no split {split!r}; its splits are: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded, source
    if not path.exists() and (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"dataset folder {name!r} does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"dataset {name!r} is a file; expected a folder (save_to_disk or data files) or a hub name")
    try:
        loaded = datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as error:  # noqa: BLE001 - network, missing files, bad splits: all one line
        where = "the folder" if path.exists() else "a hub name (needs the network, or the hub cache with HF_HUB_OFFLINE=1)"
        raise ValueError(f"cannot load dataset {name!r} as {where}: {_first_line(error)}") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):  # only when split is None
        raise ValueError(f"dataset {name!r} gave several splits ({', '.join(loaded)}); choose one with split")
    return loaded, source


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _is_iterable(loaded: Any) -> bool:
    import datasets

    return isinstance(loaded, datasets.IterableDataset)


def _column_names(loaded: Any) -> list[str]:
    columns = loaded.column_names
    if columns is None:  # a streamed dataset whose features are unknown until read
        first = next(iter(loaded.take(1)), None)
        columns = list(first) if first is not None else []
    return list(columns)


def _caption_column(requested: str | None, columns: list[str], required: bool, source: str) -> str | None:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"caption column {requested!r} is not in {source}; its columns are: {', '.join(columns)}")
        return requested
    if DEFAULT_CAPTION_COLUMN in columns:
        return DEFAULT_CAPTION_COLUMN
    if required:
        raise ValueError(
            f"caption column {DEFAULT_CAPTION_COLUMN!r} is not in {source}; its columns are: {', '.join(columns)} "
            "(name the one holding captions)"
        )
    return None


def _undecoded(loaded: Any, image_column: str) -> Any:
    """The dataset with its image column left encoded ({"bytes", "path"}), so images are read one at a time here."""
    import datasets

    features = loaded.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return loaded.cast_column(image_column, datasets.Image(decode=False))
    return loaded


def _stored_path(value: Any) -> str | None:
    """The file path stored with an encoded image ({"bytes", "path"} or a path string), if any."""
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return value["path"]
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return None


def _row_reader(table: Any, image_column: str, row: int) -> Callable[[], Any]:
    return lambda: table[row][image_column]


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


# Captions and images


def _caption_value(value: Any, where: str) -> str:
    """A caption as stored: a string (stripped; "" is none) or None."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"caption in {where} is a {type(value).__name__}; expected a string")
    caption = value.strip()
    try:
        check_prompt_characters(caption)
    except ValueError as error:
        raise ValueError(f"caption in {where}: {error}") from None
    return caption


def _require_captions(entries: Sequence[_Entry], captions: Sequence[str], expected: str) -> None:
    missing = [entry for entry, caption in zip(entries, captions) if not caption]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"image {_full_name(missing[0])} has no caption{more}; captions are required here, expected {expected}"
        )


def _full_name(entry: _Entry, value: Any = None) -> str:
    """The entry's name for a message: a quoted path, or a dataset row with the file path stored with its image."""
    if entry.is_path:
        return repr(entry.name)
    if value is None:
        try:
            value = entry.read()
        except Exception:  # noqa: BLE001 - only for a message
            return entry.name
    path = _stored_path(value)
    return entry.name if path is None else f"{entry.name} ({path!r})"


def _decode(entry: _Entry) -> Image.Image:
    """The entry's image, decoded, upright and RGB; a one-line ValueError naming it if it cannot be read."""
    value = None
    try:
        value = entry.read()
        if isinstance(value, Image.Image):
            return ImageOps.exif_transpose(value).convert("RGB")
        if isinstance(value, (str, os.PathLike)):
            opened = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            opened = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            opened = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        else:
            described = "nothing" if value is None else f"a {type(value).__name__}"
            raise ValueError(f"it is {described}; expected an image, its bytes or its path")
        with opened:
            opened.load()
            return ImageOps.exif_transpose(opened).convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise ValueError(f"cannot read image {_full_name(entry, value)}: {_first_line(error)}") from None


def _checked(data: TrainingData, skip_unreadable: bool, check_images: bool) -> TrainingData:
    """Decode every image once (nothing kept): refuse the first unreadable one, or leave them all out with a warning."""
    if not check_images:
        return data
    keep, skipped = [], []
    for index, entry in enumerate(data._entries):
        try:
            _decode(entry)
        except ValueError as error:
            if not skip_unreadable:
                raise
            skipped.append((entry.name, str(error)))
            continue
        keep.append(index)
    if not skipped:
        return data
    if not keep:
        raise ValueError(f"none of the {len(data)} images in {data.source} can be read; first: {skipped[0][1]}")
    shown = ", ".join(repr(name) for name, _ in skipped[:_SHOWN_NAMES]) + (", ..." if len(skipped) > _SHOWN_NAMES else "")
    logger.warning("skipped %d unreadable images of %d in %s: %s", len(skipped), len(data), data.source, shown)
    return TrainingData(data.source, [data._entries[i] for i in keep], [data.captions[i] for i in keep],
                        [name for name, _ in skipped], {column: [values[i] for i in keep] for column, values in data.texts.items()})
