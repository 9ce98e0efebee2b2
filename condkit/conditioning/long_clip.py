"""Long-CLIP: CLIP text encoders with a longer position table (248 tokens instead of 77).

Knowledge-preserved stretching (Zhang et al., Long-CLIP, 2024) keeps the first `keep` position rows,
which CLIP learned well, and stretches the rest by linear interpolation so that a table of `L` rows
becomes `ratio * L - (ratio - 1) * keep` rows (77 → 248 with keep=20, ratio=4). Row p >= keep reads
the old table at s = keep + (p - keep) / ratio, interpolating between rows floor(s) and floor(s) + 1;
the last `ratio - 1` rows lie past the old table and extrapolate its last step linearly.

`LongCLIPConditioner` is `CLIPConditioner` with a 248-token window: same A1111 syntax, emphasis,
BREAK and clip_skip. Prompts longer than one window are split into several 248-token windows that
are concatenated along the token axis (as A1111 does with 77); `max_chunks=1` truncates instead and
warns how many tokens were dropped.

By default the last window's states stop at the smallest multiple of 77 that holds the longest
prompt (`pad_to_multiple_of`): the UNet sees 77 positions for a short prompt, 154 for a 100-token
one, never padding it was not trained on beyond that; the states kept are exactly the window's.

Padding is an explicit choice (`pad_token`): the released Long-CLIP pads with token id 0 ("!"),
Hugging Face / Stable Diffusion tokenizers pad SD1.x with <|endoftext|>. Because the encoder is
causal, states up to the end-of-text token do not depend on it, but the padded positions do, and
the UNet attends to every position, so the two choices give different images.
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import get_module_execution_device
from torch import nn

from condkit.conditioning import CLIP_POSITIONS
from condkit.conditioning.clip import CLIPConditioner, pipeline_text_encoders
from condkit.conditioning.registry import register_conditioner

PadToken = Literal["eos", "zero"]
LONG_CLIP_KEEP = 20
LONG_CLIP_RATIO = 4


def stretched_length(length: int, keep: int = LONG_CLIP_KEEP, ratio: int = LONG_CLIP_RATIO) -> int:
    """Rows of a `length`-row table after stretching: ratio * length - (ratio - 1) * keep."""
    _check_stretch(length, keep, ratio)
    return ratio * length - (ratio - 1) * keep


def stretch_position_table(
    table: torch.Tensor, keep: int = LONG_CLIP_KEEP, ratio: int = LONG_CLIP_RATIO
) -> torch.Tensor:
    """Knowledge-preserved stretching of a (positions, dim) table; returns a new tensor."""
    if table.ndim != 2:
        raise ValueError(f"expected a (positions, dim) table, got shape {tuple(table.shape)}")
    length = table.shape[0]
    new_length = stretched_length(length, keep, ratio)
    positions = torch.arange(keep, new_length, dtype=torch.float64, device=table.device)
    source = keep + (positions - keep) / ratio
    low = source.floor().clamp(max=length - 2).long()
    fraction = (source - low).unsqueeze(-1)
    old = table.detach().to(torch.float64)
    stretched = (1 - fraction) * old[low] + fraction * old[low + 1]
    return torch.cat([table.detach()[:keep], stretched.to(table.dtype)])


def _check_stretch(length: int, keep: int, ratio: int) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be an integer >= 1, got {ratio!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep < length:
        raise ValueError(f"keep must be an integer in [1, {length - 1}] for a {length}-position table, got {keep!r}")


def text_embeddings(text_encoder: nn.Module) -> nn.Module:
    """The CLIPTextEmbeddings of a CLIPTextModel(WithProjection), transformers 4.x or 5.x layout."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    embeddings = getattr(inner, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "position_embedding"):
        raise TypeError(f"expected a CLIP text model with embeddings.position_embedding, got {type(text_encoder).__name__}")
    return embeddings


def position_count(text_encoder: nn.Module) -> int:
    """How many token positions a CLIP text model accepts."""
    return text_embeddings(text_encoder).position_embedding.num_embeddings


def stretch_text_model(
    text_encoder: nn.Module, keep: int = LONG_CLIP_KEEP, ratio: int = LONG_CLIP_RATIO, *, inplace: bool = False
) -> nn.Module:
    """Stretch a CLIPTextModel(WithProjection)'s position table; returns a stretched copy (or, with
    inplace=True, the same model changed in place).

    Replaces embeddings.position_embedding with an nn.Embedding of the new size, resizes the
    position_ids buffer and sets config.max_position_embeddings. Dtype, device and requires_grad
    follow the original table.
    """
    model = text_encoder if inplace else copy.deepcopy(text_encoder)
    embeddings = text_embeddings(model)
    old = embeddings.position_embedding.weight
    table = stretch_position_table(old, keep, ratio)
    new_length = table.shape[0]
    position_embedding = nn.Embedding(new_length, table.shape[1], device=table.device, dtype=table.dtype)
    with torch.no_grad():
        position_embedding.weight.copy_(table)
    position_embedding.weight.requires_grad_(old.requires_grad)
    embeddings.position_embedding = position_embedding
    embeddings.position_ids = torch.arange(new_length, device=table.device).expand((1, -1))
    for module in (model, getattr(model, "text_model", model)):
        config = getattr(module, "config", None)
        if config is not None:
            config.max_position_embeddings = new_length
    return model


def stretch_tokenizer(tokenizer: Any, length: int, pad_token: PadToken | None = None, *, inplace: bool = False) -> Any:
    """A copy of `tokenizer` (or the tokenizer itself with inplace=True) that pads and truncates to
    `length` tokens; pad_token "eos" pads with <|endoftext|> (HF/SD), "zero" with token id 0
    (Long-CLIP), None keeps the tokenizer's own pad token."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2 (room for BOS and EOS), got {length!r}")
    if pad_token not in (None, "eos", "zero"):
        raise ValueError(f"pad_token must be 'eos', 'zero' or None, got {pad_token!r}")
    stretched = tokenizer if inplace else copy.deepcopy(tokenizer)
    stretched.model_max_length = length
    if pad_token == "eos":
        stretched.pad_token = stretched.eos_token
    elif pad_token == "zero":
        stretched.pad_token = stretched.convert_ids_to_tokens(0)
    return stretched


@register_conditioner("long-clip")
class LongCLIPConditioner(CLIPConditioner):
    """CLIPConditioner over Long-CLIP text encoders: one window = the encoders' position count (248).

    Args:
        tokenizers, text_encoders: as CLIPConditioner; every encoder must accept the same number of
            positions (stretched or converted Long-CLIP models).
        clip_skip, zero_empty_negative, emphasis, empty_negative: as CLIPConditioner (prompt editing, alternation
            and AND included).
        max_chunks: None (default) splits long prompts into several windows; 1 truncates at one
            window with a warning naming the number of dropped tokens.
        pad_to_multiple_of: 77 (default) returns the last window's states only up to the smallest
            multiple of 77 that holds the batch's longest prompt, so a short prompt gives the UNet
            77 positions, as it was trained with, instead of 248 mostly padding; None returns whole
            248-token windows, as the released Long-CLIP demos do. Measured on the shapes world, the
            whole window costs 2.5 points of short-prompt binding and gains nothing on long prompts.

    Saved (`save_pretrained`) with its options; a converted or fine-tuned first encoder (one given by
    `text_encoder_path`) is saved with it as text_encoder/ and tokenizer/, a stretched one is
    stretched again from the pipeline's on load.
    """

    config_names = (
        "clip_skip", "zero_empty_negative", "max_chunks", "pad_to_multiple_of", "emphasis", "keep", "ratio", "pad_token",
        "empty_negative",
    )  # fmt: skip
    reproduces_pipeline_prompts = False
    keep: int = LONG_CLIP_KEEP
    ratio: int = LONG_CLIP_RATIO
    pad_token: PadToken | None = None
    has_own_text_encoder: bool = False

    def __init__(
        self,
        tokenizers: list[Any],
        text_encoders: list[nn.Module],
        *,
        clip_skip: int | None = None,
        zero_empty_negative: bool = False,
        max_chunks: int | None = None,
        pad_to_multiple_of: int | None = CLIP_POSITIONS,
        emphasis: str = "original",
        empty_negative: str = "text",
    ) -> None:
        windows = sorted({position_count(encoder) for encoder in text_encoders})
        if len(windows) > 1:
            raise ValueError(f"text encoders accept different numbers of positions {windows}; expected one window")
        super().__init__(
            tokenizers,
            text_encoders,
            clip_skip=clip_skip,
            zero_empty_negative=zero_empty_negative,
            max_chunks=max_chunks,
            window=windows[0] if windows else None,
            pad_to_multiple_of=pad_to_multiple_of,
            emphasis=emphasis,
            empty_negative=empty_negative,
        )

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        text_encoder_path: str | Path | None = None,
        *,
        keep: int = LONG_CLIP_KEEP,
        ratio: int = LONG_CLIP_RATIO,
        pad_token: PadToken | None = None,
        **options: Any,
    ) -> LongCLIPConditioner:
        """Long-CLIP conditioning for a StableDiffusion(XL) pipeline, leaving the pipeline untouched.

        With no `text_encoder_path` every encoder is a stretched copy of the pipeline's own. With a
        path (a folder from `convert_longclip_checkpoint`, or any Hugging Face CLIP text model folder
        with more positions), that model replaces the first encoder (CLIP-L, for SD1.x and SDXL) and
        SDXL's second encoder is stretched, as the Long-CLIP SDXL demo does. The tokenizer comes from
        the folder's tokenizer/ when present, else from the pipeline. `pad_token`: see
        `stretch_tokenizer`; None keeps each tokenizer's own (SD1.x: <|endoftext|>; SDXL's second: "!").
        An SD3 or Flux pipeline gets its own conditioner (see `transformer_long_clip`).
        """
        if cls is LongCLIPConditioner and getattr(pipe, "transformer", None) is not None:
            from condkit.conditioning.transformer_long_clip import transformer_long_clip_conditioner

            return transformer_long_clip_conditioner(pipe, text_encoder_path, keep=keep, ratio=ratio, pad_token=pad_token, **options)
        pairs = list(zip(*pipeline_text_encoders(pipe)))
        if getattr(pipe, "text_encoder_2", None) is not None:
            options.setdefault("zero_empty_negative", bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
        tokenizers, encoders = [], []
        for index, (tokenizer, encoder) in enumerate(pairs):
            if index == 0 and text_encoder_path is not None:
                tokenizer, encoder = _load_long_text_encoder(Path(text_encoder_path), like=encoder, tokenizer=tokenizer)
            else:
                encoder = stretch_text_model(encoder, keep, ratio)
            tokenizers.append(stretch_tokenizer(tokenizer, position_count(encoder), pad_token))
            encoders.append(encoder)
        conditioner = cls(tokenizers, encoders, **options)
        conditioner.keep, conditioner.ratio, conditioner.pad_token = keep, ratio, pad_token
        conditioner.has_own_text_encoder = text_encoder_path is not None
        conditioner._pipeline_lora = _PipelineLoraWatch([encoder for _, encoder in pairs])
        return conditioner

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        watch = getattr(self, "_pipeline_lora", None)
        if watch is not None:
            watch.check()
        return super().embed(*args, **kwargs)

    def save_parts(self, folder: Path) -> None:
        if self.has_own_text_encoder:
            self.text_encoders[0].save_pretrained(folder / "text_encoder")
            self.tokenizers[0].save_pretrained(folder / "tokenizer")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        return {"text_encoder_path": folder} if (folder / "text_encoder" / "config.json").is_file() else {}


def lora_layer_state(encoders: list[nn.Module]) -> tuple:
    """What the peft LoRA layers of `encoders` hold (adapters, scales, which are active): changes when a LoRA is
    loaded, removed, re-scaled or switched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return tuple(
        (index, name, tuple(module.active_adapters), tuple(sorted(getattr(module, "scaling", {}).items())), module.disable_adapters)
        for index, encoder in enumerate(encoders)
        for name, module in encoder.named_modules()
        if isinstance(module, BaseTunerLayer)
    )


class _PipelineLoraWatch:
    """Long-CLIP encodes with stretched copies of the pipeline's encoders, made when it is built: they carry the
    LoRAs loaded by then, at their scales, and cannot follow later changes. This notices such a change and says so,
    instead of encoding without the LoRA the pipeline now has."""

    def __init__(self, encoders: list[nn.Module]) -> None:
        self.encoders = [weakref.ref(encoder) for encoder in encoders]
        self.state = lora_layer_state(encoders)

    def check(self) -> None:
        encoders = [reference() for reference in self.encoders]
        if any(encoder is None for encoder in encoders):
            return
        if lora_layer_state(encoders) != self.state:
            raise ValueError(
                "the pipeline's text-encoder LoRAs changed after this Long-CLIP conditioner was built (it encodes with "
                "stretched copies of the encoders): build it again with load_conditioner after loading or re-scaling LoRAs"
            )


def _load_long_text_encoder(path: Path, like: nn.Module, tokenizer: Any) -> tuple[Any, nn.Module]:
    """Load a Long-CLIP text model as the class of the pipeline encoder it replaces, on its device/dtype."""
    if (path / "text_encoder" / "config.json").is_file():
        model_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    elif (path / "config.json").is_file():
        model_dir, tokenizer_dir = path, path
    else:
        raise FileNotFoundError(f"no Long-CLIP text encoder in {path}: expected text_encoder/config.json or config.json")
    encoder = type(like).from_pretrained(model_dir).to(device=get_module_execution_device(like), dtype=like.dtype).eval()
    if encoder.config.hidden_size != like.config.hidden_size:
        raise ValueError(
            f"text encoder in {model_dir} has hidden size {encoder.config.hidden_size}; the pipeline's encoder it "
            f"replaces has {like.config.hidden_size}"
        )
    if position_count(encoder) <= position_count(like):
        raise ValueError(
            f"text encoder in {model_dir} has {position_count(encoder)} positions; a Long-CLIP encoder has more "
            f"than the pipeline's {position_count(like)}"
        )
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer = type(tokenizer).from_pretrained(tokenizer_dir)
    return tokenizer, encoder
