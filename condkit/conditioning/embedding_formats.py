"""Textual-inversion embedding files: every layout users have, read, recognised and written.

A `LearnedEmbedding` holds one token's vectors, one (n_vectors, width) tensor per text encoder.
The file formats, by the name `detect_format` returns:

- "diffusers": {token: tensor[n, width]} in learned_embeds.safetensors or learned_embeds.bin
  (diffusers' textual_inversion example, the sd-concepts-library).
- "diffusers_sdxl": two such files side by side, learned_embeds.safetensors for text encoder 1 and
  learned_embeds_2.safetensors for text encoder 2, under the same token (diffusers' SDXL example).
- "a1111": a torch pickle {"string_to_token": {"*": 265}, "string_to_param": {"*": tensor[n, width]},
  "name", "step", "sd_checkpoint", "sd_checkpoint_name"}; also the original textual-inversion
  code's variant whose string_to_param is an nn.ParameterDict.
- "sdxl_single_file": {"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]} (A1111, civitai, kohya SDXL).
- "clip_l": {"clip_l": tensor[n, 768]} (diffusers' advanced pivotal-tuning scripts for SD1.x).
- "kohya": {"emb_params": tensor[n, width]} (kohya sd-scripts).
- "sd3_single_file": {"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280], "t5xxl": tensor[n, 4096]} and
  "flux_single_file": {"clip_l": tensor[n, 768], "t5xxl": tensor[n, 4096]}: ComfyUI's keys for SD3's and
  Flux's encoders (its loader takes each encoder's vectors from its key), one vector set per encoder.

Token names: an explicit `token` wins; otherwise the diffusers key or A1111's "name" field (as
diffusers reads them); formats that store no name take the file name's stem, as A1111 does.

Torch pickles (.pt, .bin) load with torch.load(weights_only=True): tensors, dicts, lists, strings
and numbers only (plus nn.ParameterDict, rebuilt from plain data); a file that needs any other
object is refused before any of its code can run. Files are recognised by their bytes, not their
suffix. Writing is atomic (condkit.files.write_atomically: a temporary file in the same folder,
then os.replace) and refuses to replace an existing file unless overwrite=True.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from condkit.files import load_pickle_safely, write_atomically

FORMATS = ("diffusers", "diffusers_sdxl", "a1111", "sdxl_single_file", "clip_l", "kohya", "sd3_single_file", "flux_single_file")
ENCODER_KEYS = {"sdxl_single_file": ("clip_l", "clip_g"), "sd3_single_file": ("clip_l", "clip_g", "t5xxl"),
                "flux_single_file": ("clip_l", "t5xxl")}  # the vectors' keys, in text-encoder order
SINGLE_ENCODER_FORMATS = ("diffusers", "a1111", "clip_l", "kohya")
DIFFUSERS_FILE_STEM = "learned_embeds"
SECOND_FILE_MARK = "_2"
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# A1111 writes the CLIP id of its "*" placeholder; readers ignore it, but its own loader expects the key.
A1111_PLACEHOLDER_ID = 265


@dataclass(eq=False)
class LearnedEmbedding:
    """One token's learned vectors: `vectors[i]` is an (n_vectors, width) tensor for text encoder i.

    SDXL embeddings have two entries: clip_l (encoder 1) first, clip_g (encoder 2) second. `step` is
    the training step A1111 files record (None where the format has no such field).
    """

    token: str
    vectors: list[torch.Tensor]
    step: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token or self.token != self.token.strip():
            raise ValueError(f"token must be a non-empty string without surrounding whitespace, got {self.token!r}")
        if isinstance(self.vectors, torch.Tensor):
            self.vectors = [self.vectors]
        if not self.vectors:
            raise ValueError(f"embedding {self.token!r} has no vectors; expected one tensor per text encoder")
        self.vectors = [self._as_matrix(i, v) for i, v in enumerate(self.vectors)]
        counts = [v.shape[0] for v in self.vectors]
        if len(set(counts)) != 1:
            raise ValueError(
                f"embedding {self.token!r} has {counts} vectors for its text encoders; expected the same count for each"
            )

    def _as_matrix(self, index: int, vectors: torch.Tensor) -> torch.Tensor:
        if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
            raise TypeError(f"embedding {self.token!r}: vectors for encoder {index + 1} must be a float tensor, got {vectors!r:.80}")
        vectors = vectors.detach()
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(
                f"embedding {self.token!r}: vectors for encoder {index + 1} have shape {tuple(vectors.shape)}; "
                "expected (n_vectors, width) with n_vectors >= 1"
            )
        if not torch.isfinite(vectors).all():
            raise ValueError(f"embedding {self.token!r}: vectors for encoder {index + 1} contain NaN or inf")
        return vectors

    @property
    def n_vectors(self) -> int:
        return self.vectors[0].shape[0]

    @property
    def widths(self) -> list[int]:
        return [v.shape[1] for v in self.vectors]

    @property
    def token_names(self) -> list[str]:
        """The tokenizer entries a multi-vector token becomes: "<tok>", "<tok>_1", … (diffusers' convention)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.n_vectors)]


def detect_format(path: str | os.PathLike) -> str:
    """The format name (one of FORMATS) of an embedding file, or of a folder holding learned_embeds files."""
    return _read(Path(path), token=None)[0]


def read_embedding(path: str | os.PathLike, token: str | None = None) -> LearnedEmbedding:
    """Read an embedding file in any of FORMATS; `token` overrides the name stored in (or implied by) the file."""
    return _read(Path(path), token)[1]


def write_embedding(
    embedding: LearnedEmbedding,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write `embedding` in `format` and return the file(s) written.

    `path` is the file (for "diffusers_sdxl" the first file; the second is written beside it with
    "_2" added to the stem) or an existing folder, which receives learned_embeds.safetensors. The
    suffix picks the container: .safetensors, or a torch pickle for .pt/.bin. Without `format`:
    "sdxl_single_file" for two encoders, "a1111" for a .pt file, else "diffusers".
    """
    path = Path(path)
    if path.is_dir():
        path = path / f"{DIFFUSERS_FILE_STEM}{SAFETENSORS_SUFFIX}"
    format = format or _default_format(embedding, path)
    if format not in FORMATS:
        raise ValueError(f"unknown embedding format {format!r}; expected one of: {', '.join(FORMATS)}")
    expected_encoders = 1 if format in SINGLE_ENCODER_FORMATS else len(ENCODER_KEYS.get(format, (0, 0)))
    if len(embedding.vectors) != expected_encoders:
        raise ValueError(
            f"format {format!r} holds vectors for {expected_encoders} text encoder(s), but embedding "
            f"{embedding.token!r} has {len(embedding.vectors)}"
        )
    container = _container_for_suffix(path)
    if format == "a1111" and container == "safetensors":
        raise ValueError(f"format 'a1111' is a torch pickle; got {path.name!r}, expected a .pt or .bin file")

    contents = _contents(embedding, format)
    targets = [path] if format != "diffusers_sdxl" else [path, _second_file(path)]
    for target in targets:
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    for target, data in zip(targets, contents):
        write_atomically(target, lambda temporary, data=data: _save(data, temporary, container))
    return targets


def _default_format(embedding: LearnedEmbedding, path: Path) -> str:
    if len(embedding.vectors) == 2:
        return "sdxl_single_file"
    return "a1111" if path.suffix == ".pt" else "diffusers"


def _contents(embedding: LearnedEmbedding, format: str) -> list[dict[str, Any]]:
    vectors = [v.detach().cpu().contiguous().clone() for v in embedding.vectors]
    if format == "diffusers":
        return [{embedding.token: vectors[0]}]
    if format == "diffusers_sdxl":
        return [{embedding.token: vectors[0]}, {embedding.token: vectors[1]}]
    if format == "a1111":
        return [
            {
                "string_to_token": {"*": A1111_PLACEHOLDER_ID},
                "string_to_param": {"*": vectors[0]},
                "name": embedding.token,
                "step": embedding.step or 0,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
            }
        ]
    if format in ENCODER_KEYS:
        return [dict(zip(ENCODER_KEYS[format], vectors))]
    if format == "clip_l":
        return [{"clip_l": vectors[0]}]
    return [{"emb_params": vectors[0]}]


def _save(data: dict[str, Any], path: Path, container: str) -> None:
    if container == "safetensors":
        safetensors.torch.save_file(data, str(path))
    else:
        torch.save(data, path)


def _container_for_suffix(path: Path) -> str:
    if path.suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if path.suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise ValueError(
        f"cannot tell the container of {path.name!r} from its suffix; expected {SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}"
    )


def _second_file(path: Path) -> Path:
    return path.with_name(f"{path.stem}{SECOND_FILE_MARK}{path.suffix}")


# ---------------------------------------------------------------------------------------------- reading


def _read(path: Path, token: str | None) -> tuple[str, LearnedEmbedding]:
    path = _resolve_folder(path)
    data = _load_flat_or_pickled(path)
    format = _classify(data, path)
    if format == "diffusers":
        name, vectors = _single_item(data)
        partner = _diffusers_sdxl_partner(path, name)
        if partner is None:
            return format, LearnedEmbedding(token or name, [vectors])
        partner_is_second, partner_vectors = partner
        pair = [vectors, partner_vectors] if partner_is_second else [partner_vectors, vectors]
        return "diffusers_sdxl", LearnedEmbedding(token or name, pair)
    if format == "a1111":
        return format, _from_a1111(data, path, token)
    stem_token = token or path.stem
    if format in ENCODER_KEYS:
        return format, LearnedEmbedding(stem_token, [data[key] for key in ENCODER_KEYS[format]])
    if format == "clip_l":
        return format, LearnedEmbedding(stem_token, [data["clip_l"]])
    return format, LearnedEmbedding(stem_token, [data["emb_params"]])


def _resolve_folder(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"embedding file {path} does not exist")
    if not path.is_dir():
        return path
    for suffix in (SAFETENSORS_SUFFIX, ".bin"):
        candidate = path / f"{DIFFUSERS_FILE_STEM}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"folder {path} holds no {DIFFUSERS_FILE_STEM}.safetensors or {DIFFUSERS_FILE_STEM}.bin")


def _load_flat_or_pickled(path: Path) -> Any:
    with path.open("rb") as stream:
        head = stream.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return safetensors.torch.load_file(str(path), device="cpu")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        # nn.ParameterDict (the original textual-inversion code's files) is rebuilt from plain data
        return load_pickle_safely(path, allowed=[torch.nn.ParameterDict])
    raise ValueError(f"{path} is neither a safetensors file nor a torch pickle (it starts with {head[:8]!r})")


def _classify(data: Any, path: Path) -> str:
    if not isinstance(data, dict):
        raise ValueError(
            f"unknown textual-inversion format in {path}: found a {type(data).__name__}; expected a dict "
            "(see condkit.conditioning.embedding_formats.FORMATS)"
        )
    keys = set(data)
    if "string_to_param" in keys:
        return "a1111"
    for format, encoder_keys in ENCODER_KEYS.items():
        if keys == set(encoder_keys):
            return format
    if keys == {"clip_l"}:
        return "clip_l"
    if keys == {"emb_params"}:
        return "kohya"
    if len(keys) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return "diffusers"
    shown = ", ".join(repr(k) for k in sorted(map(str, keys))[:8]) + (", …" if len(keys) > 8 else "")
    raise ValueError(
        f"unknown textual-inversion format in {path}: found keys [{shown}]; expected one {{token: tensor}} "
        "(diffusers), 'string_to_param' (A1111), 'clip_l' + 'clip_g' (SDXL), 'clip_l' + 'clip_g' + 't5xxl' (SD3), "
        "'clip_l' + 't5xxl' (Flux), 'clip_l', or 'emb_params' (kohya)"
    )


def _diffusers_sdxl_partner(path: Path, name: str) -> tuple[bool, torch.Tensor] | None:
    """The other file of diffusers' SDXL layout (learned_embeds + learned_embeds_2) if it holds the same token.

    Returns whether the partner is the second file, and its vectors.
    """
    is_second = path.stem.endswith(SECOND_FILE_MARK)
    partner = path.with_name(path.stem[: -len(SECOND_FILE_MARK)] + path.suffix) if is_second else _second_file(path)
    if not partner.is_file():
        return None
    data = _load_flat_or_pickled(partner)
    if not isinstance(data, dict) or set(data) != {name}:
        return None
    return not is_second, data[name]


def _single_item(data: dict[str, Any]) -> tuple[str, torch.Tensor]:
    (name, vectors), = data.items()
    return name, vectors


def _from_a1111(data: dict[str, Any], path: Path, token: str | None) -> LearnedEmbedding:
    parameters = data["string_to_param"]
    if isinstance(parameters, torch.nn.ParameterDict):
        parameters = dict(parameters.items())
    if not isinstance(parameters, dict) or not parameters:
        raise ValueError(f"A1111 embedding {path} has an empty or malformed 'string_to_param'; expected {{'*': tensor}}")
    vectors = parameters.get("*", next(iter(parameters.values())))
    stored_name = data.get("name")
    name = token or (stored_name.strip() if isinstance(stored_name, str) and stored_name.strip() else path.stem)
    step = data.get("step")
    return LearnedEmbedding(name, [vectors], step=step if isinstance(step, int) else None)
