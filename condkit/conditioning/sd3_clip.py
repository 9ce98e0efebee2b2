"""SD3CLIPConditioner: StableDiffusion3Pipeline's (SD3, SD3.5) CLIP-L + CLIP-G + T5 prompt encoding.

`load_conditioner("clip", pipe)` gives this conditioner for an SD3 pipeline (CLIPConditioner.from_pipeline
hands over); it saves under the name "clip" and loads back the same way.

As the pipeline's encode_prompt: CLIP-L and CLIP-G each give hidden_states[-(clip_skip + 2)] of a
77-token window, concatenated on the feature axis, zero-padded to T5's width and put before T5's
last_hidden_state (max_sequence_length tokens) on the token axis; the pooled vector is CLIP-L's
text_embeds ⊕ CLIP-G's. `prompt_2` goes to CLIP-G, `prompt_3` to T5 (both default to `prompt`), and
likewise for the negatives, whose default is "". Without T5 (a pipeline loaded with
text_encoder_3=None) the T5 part is zeros, as in diffusers. With no weights and prompts within one
window, every tensor is bit-identical to `pipe.encode_prompt`.

Prompt syntax: A1111 weights and BREAK act on the CLIP parts exactly as CLIPConditioner applies them
(`emphasis`); T5 tokens are weighted as `t5_prompts` explains. CLIP prompts longer than one window:
SD3's transformer gives text tokens no positions, so the token axis holds any number of them; each
further 75-token chunk of CLIP-L/G adds 77 tokens before T5's, as A1111 (and sd_embed) extend SDXL
prompts, and the pooled vector is read from the first chunk. `max_chunks=1` truncates at the window
as the pipeline does, with a warning that counts the dropped tokens.

One deliberate difference, as for CLIPConditioner: diffusers encodes negatives with clip_skip=None;
here clip_skip applies to both, so positive and negative come from the same layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from condkit.conditioning.base import Conditioner, Conditioning, Prompt, as_negative_list, as_prompt_list
from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.t5_prompts import check_t5_options, encode_t5, refuse_scheduled_prompts


class SD3CLIPConditioner(Conditioner):
    """Prompt → SD3's prompt_embeds (CLIP-L/G hidden states, then T5) and pooled vector (CLIP-L ⊕ CLIP-G).

    Args:
        clip: a CLIPConditioner on CLIP-L and CLIP-G (both CLIPTextModelWithProjection); it holds
            clip_skip, max_chunks, emphasis and lora_scale for the CLIP parts.
        t5_tokenizer, t5_encoder: text_encoder_3 and its tokenizer, or None (the T5 part is then zeros).
        t5_width: the transformer's joint_attention_dim (T5's width), used when there is no T5.
        max_sequence_length: T5 tokens (the pipeline's default is 256; at most 512).
        t5_weighting: "interpolate" (default) or "multiply" (sd_embed's rule); see `t5_prompts`.
    """

    registered_name: ClassVar[str | None] = "clip"
    config_names = ("clip_skip", "max_chunks", "emphasis", "lora_scale", "max_sequence_length", "t5_weighting")
    reproduces_pipeline_prompts = True
    embedding_format: ClassVar[str] = "sd3_single_file"  # how textual inversion writes a token learned on it

    def __init__(
        self,
        clip: CLIPConditioner,
        t5_tokenizer: Any,
        t5_encoder: torch.nn.Module | None,
        t5_width: int,
        *,
        max_sequence_length: int = 256,
        t5_weighting: str = "interpolate",
    ) -> None:
        super().__init__()
        check_t5_options(max_sequence_length, t5_weighting)
        self.clip = clip
        self.t5_tokenizer = t5_tokenizer
        self.t5_encoder = t5_encoder
        self.t5_width = t5_width
        self.max_sequence_length = max_sequence_length
        self.t5_weighting = t5_weighting

    clip_skip = property(lambda self: self.clip.clip_skip)
    max_chunks = property(lambda self: self.clip.max_chunks)
    emphasis = property(lambda self: self.clip.emphasis)
    lora_scale = property(lambda self: self.clip.lora_scale)

    @property
    def per_encoder_prompt_names(self) -> tuple[str, ...]:
        """prompt_2 / negative_prompt_2 for CLIP-G; prompt_3 / negative_prompt_3 for T5, when the pipeline has it."""
        t5_prompts = ("prompt_3", "negative_prompt_3") if self.t5_encoder is not None else ()
        return ("prompt_2", "negative_prompt_2", *t5_prompts)

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        clip_skip: int | None = None,
        max_chunks: int | None = None,
        emphasis: str = "original",
        lora_scale: float | None = None,
        max_sequence_length: int = 256,
        t5_weighting: str = "interpolate",
    ) -> SD3CLIPConditioner:
        """Wrap an SD3 pipeline's own tokenizers and text encoders (shared, not copied)."""
        clip = CLIPConditioner(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
            clip_skip=clip_skip, max_chunks=max_chunks, emphasis=emphasis, lora_scale=lora_scale,
        )
        return cls(
            clip, pipe.tokenizer_3, pipe.text_encoder_3, int(pipe.transformer.config.joint_attention_dim),
            max_sequence_length=max_sequence_length, t5_weighting=t5_weighting,
        )

    def embed(
        self,
        prompt: Prompt,
        negative_prompt: Prompt | None = None,
        num_images_per_prompt: int = 1,
        *,
        prompt_2: Prompt | None = None,
        prompt_3: Prompt | None = None,
        negative_prompt_2: Prompt | None = None,
        negative_prompt_3: Prompt | None = None,
    ) -> Conditioning:
        prompts = as_prompt_list(prompt)
        negatives = as_negative_list(negative_prompt, len(prompts)) or [""] * len(prompts)
        prompts_3 = as_negative_list(prompt_3, len(prompts), "prompt_3") or prompts
        negatives_3 = as_negative_list(negative_prompt_3, len(prompts), "negative_prompt_3") or negatives
        refuse_scheduled_prompts(prompts, negatives, as_negative_list(prompt_2, len(prompts), "prompt_2"), prompts_3,
                                 as_negative_list(negative_prompt_2, len(prompts), "negative_prompt_2"), negatives_3)
        clip = self.clip.embed(prompts, negatives, 1, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)
        embeds = self._join(clip.prompt_embeds, self._t5(prompts_3))
        negative_embeds = self._join(clip.negative_prompt_embeds, self._t5(negatives_3))

        def repeat(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat_interleave(num_images_per_prompt, dim=0)

        return Conditioning(
            prompt_embeds=repeat(embeds),
            negative_prompt_embeds=repeat(negative_embeds),
            pooled_prompt_embeds=repeat(clip.pooled_prompt_embeds),
            negative_pooled_prompt_embeds=repeat(clip.negative_pooled_prompt_embeds),
        )

    def denoiser_inputs(self, prompt: Prompt, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The positive rows of `embed` alone (training needs no negatives), outside autocast as at inference."""
        prompts = as_prompt_list(prompt)
        refuse_scheduled_prompts(prompts)
        clip_states, pooled = self.clip.denoiser_inputs(prompts, timesteps)
        with torch.autocast(self.device.type, enabled=False):
            return self._join(clip_states, self._t5(prompts)), pooled

    def token_encoders(self) -> list[tuple[Any, torch.nn.Module]]:
        """(tokenizer, text encoder) of CLIP-L, CLIP-G and T5, as textual inversion adds tokens to them."""
        pairs = list(zip(self.clip.tokenizers, self.clip.text_encoders))
        return pairs if self.t5_encoder is None else [*pairs, (self.t5_tokenizer, self.t5_encoder)]

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        if self.t5_encoder is None:
            clip_encoder = self.clip.text_encoders[0]
            shape = (len(prompts), self.max_sequence_length, self.t5_width)
            return torch.zeros(shape, device=clip_encoder.device, dtype=clip_encoder.dtype)
        return encode_t5(
            self.t5_tokenizer, self.t5_encoder, prompts, self.max_sequence_length,
            emphasis=self.emphasis, t5_weighting=self.t5_weighting,
        )

    @staticmethod
    def _join(clip_states: torch.Tensor, t5_states: torch.Tensor) -> torch.Tensor:
        """CLIP states zero-padded to T5's width, then T5's tokens after them."""
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return torch.cat([clip_states, t5_states.to(clip_states.device)], dim=-2)


def is_sd3_pipeline(pipe: Any) -> bool:
    """SD3's layout: an SD3 transformer fed by CLIP-L, CLIP-G and T5 (text_encoder_3, possibly left out)."""
    transformer = getattr(pipe, "transformer", None)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile's wrapper
    return type(transformer).__name__ == "SD3Transformer2DModel" and "text_encoder_3" in getattr(pipe, "components", {})
