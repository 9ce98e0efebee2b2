"""CLIPConditioner: the stock CLIP text encoders of SD1.x/2.x (one) and SDXL (two, plus pooled).

Prompts use A1111 syntax — "(word:1.3)", "(word)", "[word]", BREAK — and may be longer than one
window: they are split into 75-token chunks (see `chunking`), each encoded on its own and
concatenated along the token axis, the way AUTOMATIC1111 does. Weights are applied as A1111's
emphasis option (`emphasis=`, the modes of its sd_emphasis.py):

- "original" (A1111 "Original", the default): hidden states are multiplied by their token's
  weight, then rescaled so each chunk keeps its mean.
- "no_norm" ("No norm", which A1111 notes seems to work better for SDXL): multiplied, not rescaled.
- "ignore" ("Ignore"): the syntax is parsed (brackets and ":1.3" are removed from the text, BREAK
  still breaks) but every weight is 1, so "a (red:1.5) [circle]" encodes as "a red circle".
- "none" ("None"): no parsing at all; the prompt is tokenized as written, so "(red:1.3)" is
  that text, brackets and all, and "BREAK" is the word, not a chunk break: A1111's "None" mode
  tokenizes the whole line as one run and BREAK is split out only by its emphasis parser.

With no weights and one chunk the tensors are bit-identical to the pipeline's own `encode_prompt`.

Layers, as diffusers reads them:
- SD: last_hidden_state; with clip_skip=k, final_layer_norm(hidden_states[-(k + 1)]).
- SDXL: hidden_states[-(k + 2)] (penultimate by default, no final norm) of both encoders,
  concatenated; pooled output = text_embeds of encoder 2 for the first chunk; an omitted negative
  prompt gives zeros when the pipeline's force_zeros_for_empty_prompt is set (an explicit "" too with
  empty_negative="zeros", as A1111; by default it is encoded as text, as diffusers does).

A1111 prompt editing, alternation and AND ("a [cat:dog:0.5]", "[red|blue]", "a AND b :1.2") are read by
`encode()`, which returns per-step features for such prompts (`scheduled_prompts`); `embed()` stays static.

One deliberate difference: diffusers' SD encode_prompt ignores clip_skip for the negative prompt;
here clip_skip applies to both, as in A1111, so positive and negative come from the same layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.utils.torch_utils import get_module_execution_device
from torch import nn

from condkit.conditioning.base import Conditioner, Conditioning, Prompt, as_negative_list, as_prompt_list
from condkit.conditioning.registry import register_conditioner
from condkit.conditioning.chunking import TokenChunks, chunk_prompt, empty_chunk, pad_chunks
from condkit.conditioning.embeddings import expand_prompt
from condkit.conditioning.prompt_syntax import check_prompt_characters
from condkit.conditioning.scheduled_prompts import ComposedRows, conditioning_at_step, scheduled_conditioning

logger = logging.getLogger(__name__)


EMPHASIS_MODES: tuple[str, ...] = ("original", "no_norm", "ignore", "none")
"""The `emphasis=` values; A1111's display names "Original", "No norm", "Ignore", "None" are accepted too."""
_EMPHASIS_ALIASES = {**{mode: mode for mode in EMPHASIS_MODES}, "no norm": "no_norm"}
EMPTY_NEGATIVE_MODES: tuple[str, ...] = ("text", "zeros")
"""The `empty_negative=` values: what an explicit "" negative prompt gives where the pipeline forces zeros for
empty prompts (SDXL's force_zeros_for_empty_prompt): "text" encodes "" as diffusers' encode_prompt does,
"zeros" gives zeros as A1111 does. An omitted negative gives zeros either way."""


def check_empty_negative(value: Any) -> str:
    if value not in EMPTY_NEGATIVE_MODES:
        raise ValueError(f"empty_negative must be one of {', '.join(map(repr, EMPTY_NEGATIVE_MODES))}, got {value!r}")
    return value


def normalize_emphasis(value: Any) -> str:
    """An `emphasis=` value as one of EMPHASIS_MODES: the identifier or A1111's display name, any case.

    Raises ValueError (one line, listing the choices) for anything else, Python's None included.
    """
    mode = _EMPHASIS_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if mode is None:
        raise ValueError(
            f"emphasis must be one of {', '.join(map(repr, EMPHASIS_MODES))} "
            f"(or A1111's 'Original', 'No norm', 'Ignore', 'None'), got {value!r}"
        )
    return mode


def apply_emphasis(hidden: torch.Tensor, weights: torch.Tensor, emphasis: str = "original") -> torch.Tensor:
    """A1111 emphasis on (..., tokens, dim) states with (..., tokens) weights; "original" by default.

    "no_norm" multiplies each chunk by its weights, in float32 or wider, and stops there; "ignore"
    and "none" return the states untouched (their weights are all 1 anyway). The rest is "original".

    Each chunk is multiplied by its weights and rescaled to its original mean; chunks whose
    weights are all 1 are returned untouched (bit for bit).

    The rescale factor, original mean / weighted mean, is a ratio of two means that can each be
    zero up to rounding: hidden states straight out of a LayerNorm without bias average to about
    1e-9 per chunk, so the factor is noise over noise, and a weighted mean that rounds to exactly 0
    makes it inf (then NaN where a weight is 0), or an original mean of exactly 0 makes it 0 and
    wipes the chunk out. So a chunk is rescaled only when both means are finite and stand out
    of rounding noise (more than a few ulps of the chunk's mean absolute value) and the factor is
    finite; otherwise it keeps its weighted states unrescaled, as there is no mean to restore.
    Where A1111's factor is well defined the result is A1111's, computed as it does in float32 or
    wider (its multipliers are float32, which promotes float16 states), and cast back, saturated to
    the dtype's finite range. Finite states and finite weights thus always give finite output.
    """
    emphasis = normalize_emphasis(emphasis)
    weighted_chunks = (weights != 1.0).any(dim=-1)
    if emphasis in ("ignore", "none") or not weighted_chunks.any():
        return hidden
    chunk_dims, noise_ulps = (-2, -1), 8
    compute = torch.promote_types(hidden.dtype, torch.float32)
    states = hidden.to(compute)
    largest = torch.finfo(hidden.dtype).max
    if emphasis == "no_norm":  # A1111: z * multipliers (float32 multipliers, so float16 states are promoted)
        scaled = (states * weights.unsqueeze(-1).to(compute)).clamp(-largest, largest).to(hidden.dtype)
        return torch.where(weighted_chunks[..., None, None], scaled, hidden)
    original_mean = states.mean(dim=chunk_dims, keepdim=True)
    scaled = states * weights.unsqueeze(-1).to(compute)
    new_mean = scaled.mean(dim=chunk_dims, keepdim=True)
    factor = original_mean / new_mean
    noise = noise_ulps * torch.finfo(compute).eps
    rescalable = (
        (original_mean.abs() > noise * states.abs().mean(dim=chunk_dims, keepdim=True))
        & (new_mean.abs() > noise * scaled.abs().mean(dim=chunk_dims, keepdim=True))
        & torch.isfinite(factor)
    )  # comparisons with NaN or inf means are False, so those chunks are not rescaled either
    scaled = scaled * torch.where(rescalable, factor, torch.ones_like(factor))
    scaled = scaled.clamp(-largest, largest).to(hidden.dtype)
    return torch.where(weighted_chunks[..., None, None], scaled, hidden)


def has_projection(text_encoder: nn.Module) -> bool:
    """A CLIPTextModelWithProjection (SDXL's second encoder), whose text_embeds are the pooled vector."""
    return hasattr(text_encoder, "text_projection")


def pipeline_text_encoders(pipe: Any) -> tuple[list[Any], list[nn.Module]]:
    """The (tokenizers, text encoders) a StableDiffusion(XL) pipeline has: SD one, SDXL two, the SDXL refiner its second."""
    pairs = [(getattr(pipe, f"tokenizer{suffix}", None), getattr(pipe, f"text_encoder{suffix}", None)) for suffix in ("", "_2")]
    pairs = [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]
    if not pairs:
        raise ValueError(f"{type(pipe).__name__} has no CLIP text encoder to wrap")
    return [tokenizer for tokenizer, _ in pairs], [encoder for _, encoder in pairs]


@contextmanager
def scaled_lora_layers(encoders: Iterable[nn.Module], scale: float | None) -> Iterator[None]:
    """Within the block, the peft LoRA layers of `encoders` run at `scale` (diffusers' scale_lora_layers)."""
    if scale is None:
        yield
        return
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    for encoder in encoders:
        scale_lora_layers(encoder, scale)
    try:
        yield
    finally:
        for encoder in encoders:
            unscale_lora_layers(encoder, scale)


@register_conditioner("clip")
class CLIPConditioner(Conditioner):
    """Prompt → CLIP hidden states for SD1.x/2.x (one encoder) or SDXL (two encoders + pooled).

    Args:
        tokenizers, text_encoders: one pair for SD, two for SDXL (the second a
            CLIPTextModelWithProjection, whose text_embeds become the pooled vector).
        clip_skip: layers to skip from the end, as diffusers' `clip_skip`.
        zero_empty_negative: SDXL's force_zeros_for_empty_prompt.
        max_chunks: keep at most this many chunks per prompt (1 = truncate at the window, like
            the plain pipeline); dropped tokens are reported with a warning. None keeps all.
        window: tokens per chunk including BOS/EOS (default: the tokenizer's model_max_length).
        pad_to_multiple_of: None keeps every window whole. N cuts the last window's padding: its
            states end at the smallest multiple of N that holds the longest prompt of the batch
            (positive and negative), as tokenizers' pad_to_multiple_of does. The kept states are
            exactly those of the whole window; the UNet just sees fewer padding positions.
        emphasis: "original" (default), "no_norm", "ignore" or "none", as A1111's emphasis option
            (see the module docstring); A1111's display names ("No norm", ...) are accepted.
        lora_scale: the scale of LoRA layers loaded into the text encoders (peft), applied while
            encoding exactly as the pipeline's `encode_prompt(lora_scale=...)`; None leaves them as they are.
        empty_negative: with zero_empty_negative, what an explicit "" negative gives: "text" (default, as
            diffusers' encode_prompt) or "zeros" (as A1111); an omitted negative gives zeros either way.

    Prompts with A1111 prompt editing ("[a:b:0.5]"), alternation ("[a|b]") or AND come out of `encode()`
    as features that `attach`'s hooks turn into each step's conditioning (see `scheduled_prompts`);
    every other prompt is encoded statically, as `embed()` always does.
    """

    config_names = (
        "clip_skip", "zero_empty_negative", "max_chunks", "window", "pad_to_multiple_of", "emphasis", "lora_scale",
        "empty_negative",
    )  # fmt: skip
    reproduces_pipeline_prompts = True
    schedules_prompts = True  # encode() may give per-step features, so attach installs its hooks

    def __init__(
        self,
        tokenizers: list[Any],
        text_encoders: list[nn.Module],
        *,
        clip_skip: int | None = None,
        zero_empty_negative: bool = False,
        max_chunks: int | None = None,
        window: int | None = None,
        pad_to_multiple_of: int | None = None,
        emphasis: str = "original",
        lora_scale: float | None = None,
        empty_negative: str = "text",
    ) -> None:
        super().__init__()
        emphasis = normalize_emphasis(emphasis)
        self.empty_negative = check_empty_negative(empty_negative)
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
            raise ValueError(
                f"expected one (SD) or two (SDXL) tokenizer/text-encoder pairs, got {len(tokenizers)} tokenizers "
                f"and {len(text_encoders)} text encoders"
            )
        layers = min(encoder.config.num_hidden_layers for encoder in text_encoders)
        deepest = layers - 1 if has_projection(text_encoders[-1]) else layers  # SDXL already reads the penultimate layer
        if clip_skip is not None and not 0 <= clip_skip <= deepest:
            raise ValueError(f"clip_skip must be between 0 and {deepest} for these {layers}-layer text encoders, got {clip_skip}")
        if max_chunks is not None and max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1 or None, got {max_chunks}")
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList(text_encoders)
        self.clip_skip = clip_skip
        self.zero_empty_negative = zero_empty_negative
        self.max_chunks = max_chunks
        self.window = window or self.tokenizers[0].model_max_length
        if pad_to_multiple_of is not None and not 1 <= pad_to_multiple_of <= self.window:
            raise ValueError(f"pad_to_multiple_of must be between 1 and the window ({self.window}) or None, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.emphasis = emphasis
        if lora_scale is not None and not math.isfinite(lora_scale):
            raise ValueError(f"lora_scale must be a finite number or None, got {lora_scale}")
        self.lora_scale = lora_scale

    @property
    def is_sdxl(self) -> bool:
        """SDXL-style encoding: penultimate layer, pooled vector from the last encoder — SDXL's two encoders, or
        the refiner's one (a CLIPTextModelWithProjection)."""
        return has_projection(self.text_encoders[-1])

    @property
    def per_encoder_prompt_names(self) -> tuple[str, ...]:
        """SDXL's second encoder reads prompt_2 / negative_prompt_2; one encoder (SD, the SDXL refiner) reads only the prompt."""
        return ("prompt_2", "negative_prompt_2") if len(self.text_encoders) == 2 else ()

    @classmethod
    def from_pipeline(cls, pipe: Any, **options: Any) -> Conditioner:
        """Wrap a StableDiffusion(XL) pipeline's own tokenizers and text encoders (shared, not copied); the SDXL
        refiner, which has only the second encoder, included. An SD3 or Flux pipeline gets its own conditioner
        (SD3CLIPConditioner, FluxCLIPConditioner), which saves and loads as "clip" too."""
        if cls is CLIPConditioner and getattr(pipe, "transformer", None) is not None:
            from condkit.conditioning.transformer_pipelines import transformer_clip_conditioner

            return transformer_clip_conditioner(pipe, **options)
        tokenizers, encoders = pipeline_text_encoders(pipe)
        if getattr(pipe, "text_encoder_2", None) is not None:
            options.setdefault("zero_empty_negative", bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
        return cls(tokenizers, encoders, **options)

    def embed(
        self,
        prompt: Prompt,
        negative_prompt: Prompt | None = None,
        num_images_per_prompt: int = 1,
        *,
        prompt_2: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
    ) -> Conditioning:
        """As diffusers' SDXL encode_prompt: `prompt_2` / `negative_prompt_2` go to the second encoder (default:
        the same text as the first)."""
        with scaled_lora_layers(self.text_encoders, self.lora_scale):
            return self._embed(prompt, negative_prompt, num_images_per_prompt, prompt_2, negative_prompt_2)

    def encode(
        self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1, **per_encoder_prompts: Prompt
    ) -> Conditioning:
        """`embed` without gradients, or, for prompts with A1111 prompt editing, alternation or AND, features
        that `attach` maps at every step to that step's `embed`."""
        with torch.no_grad():
            scheduled = scheduled_conditioning(self, prompt, negative_prompt, num_images_per_prompt, **per_encoder_prompts)
            return scheduled if scheduled is not None else self.embed(prompt, negative_prompt, num_images_per_prompt, **per_encoder_prompts)

    def at_timestep(
        self, features: torch.Tensor, timestep: torch.Tensor, step: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | ComposedRows:
        """Each row's conditioning at denoising step `step` = (k, N), 1-based; by default the step attach sets."""
        return conditioning_at_step(self, features, step)

    def denoiser_inputs(self, prompt: Prompt, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positive rows of `embed` alone (training needs no negatives), outside autocast as at inference."""
        with torch.autocast(self.device.type, enabled=False), scaled_lora_layers(self.text_encoders, self.lora_scale):
            conditioning = self._embed(prompt, None, 1, None, None, with_negatives=False)
        return conditioning.prompt_embeds, conditioning.pooled_prompt_embeds

    def _embed(
        self, prompt: Prompt, negative_prompt: Prompt | None, num_images_per_prompt: int, prompt_2: Prompt | None,
        negative_prompt_2: Prompt | None, with_negatives: bool = True,
    ) -> Conditioning:
        if (prompt_2 is not None or negative_prompt_2 is not None) and len(self.text_encoders) != 2:
            raise ValueError("prompt_2 and negative_prompt_2 apply to two text encoders (SDXL); this conditioner has one")
        prompts = as_prompt_list(prompt)
        prompts_2 = prompts if prompt_2 is None else as_negative_list(prompt_2, len(prompts), "prompt_2")
        negatives = as_negative_list(negative_prompt, len(prompts))
        negatives_2 = as_negative_list(negative_prompt_2, len(prompts), "negative_prompt_2")
        # As diffusers: negative_prompt_2 alone is not enough. An explicit "" only with empty_negative="zeros" (A1111 zeros
        # a batch's negatives when all are empty).
        explicitly_empty = self.empty_negative == "zeros" and negatives is not None and all(not n for n in negatives)
        explicitly_empty = explicitly_empty and (negatives_2 is None or all(not n for n in negatives_2))
        zero_negative = (negatives is None or explicitly_empty) and self.zero_empty_negative
        negatives = negatives or [""] * len(prompts)
        negatives_2 = negatives_2 or negatives
        if not with_negatives or zero_negative:
            negatives, negatives_2 = [], []

        # Every row is encoded in a batch as diffusers does: CPU kernels may round a batch of one differently.
        positive, negative = self._chunk([prompts, prompts_2]), self._chunk([negatives, negatives_2])
        n_chunks = max(c.n_chunks for side in (positive, negative) for group in side for c in group)
        length = self._output_length([positive, negative], n_chunks)
        embeds, pooled = self._encode_group(positive, n_chunks, length)
        negative_embeds = negative_pooled = None
        if zero_negative:
            negative_embeds = torch.zeros_like(embeds)
            negative_pooled = None if pooled is None else torch.zeros_like(pooled)
        elif with_negatives:
            negative_embeds, negative_pooled = self._encode_group(negative, n_chunks, length)

        def repeat(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.repeat_interleave(num_images_per_prompt, dim=0)

        return Conditioning(
            prompt_embeds=repeat(embeds),
            negative_prompt_embeds=repeat(negative_embeds),
            pooled_prompt_embeds=repeat(pooled),
            negative_pooled_prompt_embeds=repeat(negative_pooled),
        )

    def _chunk(self, texts_per_encoder: list[list[str]]) -> list[list[TokenChunks]]:
        """One list of texts per encoder (SD uses the first) → one list of TokenChunks per encoder;
        multi-vector tokens "<t>" expand to "<t> <t>_1 …".

        Under "none" emphasis the text is tokenized as written; under "ignore" it is parsed, then
        every weight is set to 1.
        """
        for texts in texts_per_encoder:
            for text in texts:
                check_prompt_characters(text)  # before a tokenizer sees them: expand_prompt tokenizes the raw text
        parse = self.emphasis != "none"
        groups = [
            [
                self._limit(chunk_prompt(tok, expand_prompt(text, tok), self.window, parse_emphasis=parse), text)
                for text in texts
            ]
            for tok, texts in zip(self.tokenizers, texts_per_encoder)
        ]
        if self.emphasis == "ignore":
            groups = [
                [TokenChunks(c.input_ids, torch.ones_like(c.weights), c.n_content_tokens) for c in group] for group in groups
            ]
        return groups

    def _limit(self, chunks: TokenChunks, text: str) -> TokenChunks:
        if self.max_chunks is None or chunks.n_chunks <= self.max_chunks:
            return chunks
        kept = TokenChunks(chunks.input_ids[: self.max_chunks], chunks.weights[: self.max_chunks], chunks.n_content_tokens)
        capacity = self.max_chunks * (self.window - 2)
        logger.warning(
            f"prompt truncated to {self.max_chunks} chunk(s) of {self.window} tokens: dropped "
            f"{max(chunks.n_content_tokens - capacity, 0)} of {chunks.n_content_tokens} tokens of {text[:60]!r}"
        )
        return kept

    def _output_length(self, sides: list[list[list[TokenChunks]]], n_chunks: int) -> int:
        """Rows of hidden states to return: every window, the last one cut by pad_to_multiple_of.

        `sides` are `_chunk` results (one group per tokenizer), e.g. [positives, negatives].
        """
        if self.pad_to_multiple_of is None:
            return n_chunks * self.window
        longest = 2  # an empty prompt, which fills a missing last window: BOS, EOS
        for side in sides:
            for tokenizer, group in zip(self.tokenizers, side):
                for chunks in group:
                    if chunks.n_chunks == n_chunks:
                        end_of_text = (chunks.input_ids[-1] == tokenizer.eos_token_id).nonzero()
                        longest = max(longest, int(end_of_text[0]) + 1 if len(end_of_text) else self.window)
        multiple = self.pad_to_multiple_of
        return (n_chunks - 1) * self.window + min(-(-longest // multiple) * multiple, self.window)

    def _encode_group(
        self, chunks_per_encoder: list[list[TokenChunks]], n_chunks: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode one batch of prompts with every encoder; concatenate hidden states, and the pooled text_embeds
        of every encoder that has a projection (SDXL: encoder 2; SD3's CLIP-L and CLIP-G: both)."""
        hidden_parts, pooled_parts = [], []
        for tokenizer, encoder, group in zip(self.tokenizers, self.text_encoders, chunks_per_encoder):
            filler = empty_chunk(tokenizer, self.window)
            group = [pad_chunks(c, n_chunks, filler) for c in group]
            device = get_module_execution_device(encoder)  # offload-aware: where its hooks run it, not where its weights wait
            ids = torch.cat([c.input_ids for c in group]).to(device)
            weights = torch.stack([c.weights for c in group]).to(device)
            output = encoder(ids, output_hidden_states=self.is_sdxl or self.clip_skip is not None)
            states = self._select_layer(encoder, output).view(len(group), n_chunks, self.window, -1)
            states = apply_emphasis(states, weights, self.emphasis)
            hidden_parts.append(states.reshape(len(group), n_chunks * self.window, -1))
            if getattr(output, "text_embeds", None) is not None:
                pooled_parts.append(output.text_embeds.view(len(group), n_chunks, -1)[:, 0])
        hidden = torch.cat(hidden_parts, dim=-1)[:, :length].to(self.text_encoders[-1].dtype)
        pooled = torch.cat(pooled_parts, dim=-1) if pooled_parts else None
        return hidden, (None if pooled is None else pooled.to(hidden.dtype))

    def _select_layer(self, encoder: nn.Module, output: Any) -> torch.Tensor:
        if self.is_sdxl:
            return output.hidden_states[-((self.clip_skip or 0) + 2)]
        if self.clip_skip is None:
            return output.last_hidden_state
        text_model = getattr(encoder, "text_model", encoder)  # transformers 4.x nests it; 5.x does not
        return text_model.final_layer_norm(output.hidden_states[-(self.clip_skip + 1)])
