"""FluxCLIPConditioner: FluxPipeline's T5 sequence + CLIP-L pooled prompt encoding.

`load_conditioner("clip", pipe)` gives this conditioner for a Flux pipeline (CLIPConditioner.from_pipeline
hands over); it saves under the name "clip" and loads back the same way.

As the pipeline's encode_prompt: prompt_embeds are T5's last_hidden_state over max_sequence_length
tokens (512 by default), the pooled vector is CLIP-L's pooler_output of one 77-token window; `prompt`
goes to CLIP-L and `prompt_2` to T5 (default: `prompt`). With no weights and a CLIP prompt within one
window, every tensor is bit-identical to `pipe.encode_prompt`.

Negatives: Flux is guidance-distilled and has no CFG negative; the pipeline runs real CFG (a second
transformer call per step) only when it gets a negative and `true_cfg_scale > 1`. So negatives are
encoded only when `negative_prompt` is given — as the pipeline encodes them for true CFG — and the
Conditioning has none otherwise.

Prompt syntax: weights act on T5's tokens (see `t5_prompts`). CLIP-L contributes only a pooled
vector, read at the end-of-text token of the first window (up to the first BREAK), which weights do
not change (as SDXL's pooled vector in A1111); the syntax is still removed from the text CLIP-L reads.
A CLIP prompt longer than the window keeps only its first chunk there (T5 reads the whole prompt).
clip_skip is refused: a pooled output comes from the last layer whatever layer is chosen.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from condkit.conditioning.base import Conditioner, Conditioning, Prompt, as_negative_list, as_prompt_list
from condkit.conditioning.chunking import chunk_prompt
from condkit.conditioning.clip import normalize_emphasis, scaled_lora_layers
from condkit.conditioning.embeddings import expand_prompt
from condkit.conditioning.prompt_syntax import check_prompt_characters
from condkit.conditioning.t5_prompts import check_t5_options, encode_t5, refuse_scheduled_prompts

logger = logging.getLogger(__name__)


class FluxCLIPConditioner(Conditioner):
    """Prompt → Flux's prompt_embeds (T5) and pooled vector (CLIP-L).

    Args:
        clip_tokenizer, clip_encoder: the pipeline's tokenizer and text_encoder (a CLIPTextModel).
        t5_tokenizer, t5_encoder: tokenizer_2 and text_encoder_2.
        emphasis: A1111's emphasis mode, as CLIPConditioner's ("none" reads brackets as text, "ignore" drops weights).
        lora_scale: the scale of LoRA layers in both text encoders while encoding, as encode_prompt(lora_scale=...).
        max_sequence_length: T5 tokens (the pipeline's default is 512, its maximum).
        t5_weighting: "interpolate" (default) or "multiply" (sd_embed's rule); see `t5_prompts`.
    """

    registered_name: ClassVar[str | None] = "clip"
    config_names = ("emphasis", "lora_scale", "max_sequence_length", "t5_weighting")
    reproduces_pipeline_prompts = True
    embedding_format: ClassVar[str] = "flux_single_file"  # how textual inversion writes a token learned on it
    per_encoder_prompt_names: ClassVar[tuple[str, ...]] = ("prompt_2", "negative_prompt_2")  # T5's texts

    def __init__(
        self,
        clip_tokenizer: Any,
        clip_encoder: nn.Module,
        t5_tokenizer: Any,
        t5_encoder: nn.Module,
        *,
        emphasis: str = "original",
        lora_scale: float | None = None,
        max_sequence_length: int = 512,
        t5_weighting: str = "interpolate",
    ) -> None:
        super().__init__()
        check_t5_options(max_sequence_length, t5_weighting)
        self.clip_tokenizer = clip_tokenizer
        self.clip_encoder = clip_encoder
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder
        self.emphasis = normalize_emphasis(emphasis)
        self.lora_scale = lora_scale
        self.max_sequence_length = max_sequence_length
        self.t5_weighting = t5_weighting

    @classmethod
    def from_pipeline(cls, pipe: Any, *, clip_skip: int | None = None, **options: Any) -> FluxCLIPConditioner:
        """Wrap a Flux pipeline's own tokenizers and text encoders (shared, not copied)."""
        if clip_skip is not None:
            raise ValueError(
                f"clip_skip={clip_skip} does not apply to Flux: it takes only CLIP-L's pooled output, which comes from "
                "the last layer whatever layer is chosen; leave clip_skip unset"
            )
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, **options)

    def embed(
        self,
        prompt: Prompt,
        negative_prompt: Prompt | None = None,
        num_images_per_prompt: int = 1,
        *,
        prompt_2: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
    ) -> Conditioning:
        prompts = as_prompt_list(prompt)
        prompts_2 = as_negative_list(prompt_2, len(prompts), "prompt_2") or prompts
        negatives = as_negative_list(negative_prompt, len(prompts))
        negatives_2 = as_negative_list(negative_prompt_2, len(prompts), "negative_prompt_2")
        if negatives is None and negatives_2 is not None:
            raise ValueError("negative_prompt_2 needs negative_prompt on Flux (the pipeline uses negatives only with both)")
        refuse_scheduled_prompts(prompts, negatives, prompts_2, negatives_2)
        with scaled_lora_layers([self.clip_encoder, self.t5_encoder], self.lora_scale):
            embeds, pooled = self._t5(prompts_2), self._pooled(prompts)
            negative_embeds = negative_pooled = None
            if negatives is not None:
                negative_embeds, negative_pooled = self._t5(negatives_2 or negatives), self._pooled(negatives)

        def repeat(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.repeat_interleave(num_images_per_prompt, dim=0)

        return Conditioning(
            prompt_embeds=repeat(embeds),
            negative_prompt_embeds=repeat(negative_embeds),
            pooled_prompt_embeds=repeat(pooled),
            negative_pooled_prompt_embeds=repeat(negative_pooled),
        )

    def token_encoders(self) -> list[tuple[Any, nn.Module]]:
        """(tokenizer, text encoder) of CLIP-L and T5, as textual inversion adds tokens to them."""
        return [(self.clip_tokenizer, self.clip_encoder), (self.t5_tokenizer, self.t5_encoder)]

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        states = encode_t5(
            self.t5_tokenizer, self.t5_encoder, prompts, self.max_sequence_length,
            emphasis=self.emphasis, t5_weighting=self.t5_weighting,
        )
        return states.to(self.t5_encoder.dtype)

    def _pooled(self, prompts: list[str]) -> torch.Tensor:
        """CLIP-L's pooler_output for the first window of each prompt."""
        tokenizer, window = self.clip_tokenizer, self.clip_tokenizer.model_max_length
        rows = []
        for text in prompts:
            check_prompt_characters(text)
            chunks = chunk_prompt(tokenizer, expand_prompt(text, tokenizer), window, parse_emphasis=self.emphasis != "none")
            if chunks.n_chunks > 1:
                logger.info(
                    f"CLIP-L's pooled vector reads the first of {chunks.n_chunks} windows of {text[:60]!r}; T5 reads all of it"
                )
            rows.append(chunks.input_ids[0])
        output = self.clip_encoder(torch.stack(rows).to(self.clip_encoder.device), output_hidden_states=False)
        return output.pooler_output.to(self.clip_encoder.dtype)


def is_flux_pipeline(pipe: Any) -> bool:
    """Flux's layout: a Flux transformer fed by CLIP-L (text_encoder) and T5 (text_encoder_2)."""
    transformer = getattr(pipe, "transformer", None)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile's wrapper
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    return (
        type(transformer).__name__ == "FluxTransformer2DModel"
        and getattr(pipe, "text_encoder", None) is not None
        and getattr(getattr(encoder_2, "config", None), "model_type", None) == "t5"
    )
