"""LLMAdapterConditioner: a language model's hidden states, mapped per timestep by an ELLA connector.

    conditioner = LLMAdapterConditioner.from_pipeline(pipe, tokenizer, t5_encoder, connector)
    with attach(pipe, conditioner):
        image = pipe(**conditioner.encode("a red cube left of a blue ball").kwargs()).images[0]

`encode()` runs the language model once per distinct prompt and returns its last hidden states as
prompt_embeds / negative_prompt_embeds; those features travel through the pipeline like prompt
embeddings, and the attached proxy calls `at_timestep(features, t)` in every UNet call, which runs
only the connector. Any Hugging Face text model works: T5 (its encoder is used), BERT-like
encoders, or a decoder-only model (the base model's last hidden state).

Length:
- fixed (default): every prompt padded to `max_length` tokens with the tokenizer's pad token and
  encoded with an attention mask; the padded positions' states are kept, as ELLA's fixed mode does.
- flexible: each prompt encoded unpadded (truncated at `max_length`), then zero-padded to the
  longest prompt in the call. At each step, zero rows are masked out of the connector's attention,
  so every prompt is conditioned on exactly its own tokens. (A genuine hidden state that is exactly
  zero in every channel would be taken for padding; language models do not produce one.)

To keep tokens only CLIP knows (trigger words, textual-inversion embeddings), join CLIP's
embeddings after the connector's latents: `ConcatConditioner(adapter, CLIPConditioner.from_pipeline(pipe))`
(see `concat`).

An omitted negative prompt is the empty string, encoded like any prompt. ELLA's T5 was run in fp16
(its images change in fp32 or bf16); load the language model in the dtype the connector was
trained with.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from condkit.conditioning.base import (
    Conditioner,
    Conditioning,
    as_negative_list,
    as_prompt_list,
    register_conditioner,
)
from condkit.conditioning.ella_connector import TimestepAwareConnector, load_ella_checkpoint, padding_mask


def language_model_width(language_model: nn.Module) -> int:
    config = language_model.config
    return getattr(config, "hidden_size", None) or config.d_model


def hidden_state_model(language_model: nn.Module) -> nn.Module:
    """The part of a text model whose `last_hidden_state` is the feature: the encoder of an
    encoder-decoder, the base model of a model with a head (e.g. *ForCausalLM)."""
    if getattr(language_model.config, "is_encoder_decoder", False) and hasattr(language_model, "get_encoder"):
        return language_model.get_encoder()
    return language_model.base_model


def load_language_model(name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> tuple[Any, nn.Module]:
    """Tokenizer and text model; T5-family checkpoints load their encoder only."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

    encoder_classes = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}
    config = AutoConfig.from_pretrained(name_or_path)
    model_class = encoder_classes.get(config.model_type, AutoModel)
    model = model_class.from_pretrained(name_or_path, torch_dtype=torch_dtype)
    return AutoTokenizer.from_pretrained(name_or_path), model.eval()


def load_connector(
    path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **single_file_config: int
) -> TimestepAwareConnector:
    """A connector from a save_pretrained folder or a single ELLA-layout file (.safetensors/.pt/.bin).

    `single_file_config` (num_heads, num_blocks) applies to single files, which do not record them.
    """
    if os.path.isdir(path):
        return TimestepAwareConnector.from_pretrained(path, torch_dtype=torch_dtype).eval()
    return load_ella_checkpoint(path, torch_dtype=torch_dtype, **single_file_config)


@register_conditioner("llm-adapter")
class LLMAdapterConditioner(Conditioner):
    """Language-model features in `encode()`, the timestep-aware connector in `at_timestep()`.

    Args:
        tokenizer, language_model: any Hugging Face text tokenizer/model pair.
        connector: a TimestepAwareConnector whose text_dim is the language model's hidden size.
        flexible_length: encode prompts unpadded (see the module docstring); default fixed.
        max_length: fixed mode pads to it; both modes truncate at it.
        cross_attention_dim: the UNet's, checked against the connector width when given.
    """

    timestep_aware = True

    def __init__(
        self,
        tokenizer: Any,
        language_model: nn.Module,
        connector: TimestepAwareConnector,
        *,
        flexible_length: bool = False,
        max_length: int = 128,
        cross_attention_dim: int | None = None,
    ) -> None:
        super().__init__()
        hidden_size = language_model_width(language_model)
        if hidden_size != connector.config.text_dim:
            raise ValueError(
                f"language model hidden size {hidden_size} differs from the connector's text_dim "
                f"{connector.config.text_dim}"
            )
        if cross_attention_dim is not None and cross_attention_dim != connector.config.width:
            raise ValueError(
                f"connector width {connector.config.width} differs from the UNet's cross_attention_dim {cross_attention_dim}"
            )
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not flexible_length and tokenizer.pad_token_id is None:
            raise ValueError(
                f"fixed-length encoding pads with the tokenizer's pad token, but {type(tokenizer).__name__} has none; "
                "set tokenizer.pad_token or use flexible_length=True"
            )
        self.tokenizer = tokenizer
        self.language_model = language_model
        self.connector = connector
        self.flexible_length = flexible_length
        self.max_length = max_length

    @classmethod
    def from_pipeline(
        cls, pipe: Any, tokenizer: Any, language_model: nn.Module, connector: TimestepAwareConnector, **options: Any
    ) -> LLMAdapterConditioner:
        """Check the connector against `pipe.unet` (cross-attention width; a pooled head for SDXL)."""
        unet_config = pipe.unet.config
        if unet_config.get("addition_embed_type") == "text_time" and connector.pooled_head is None:
            raise ValueError(
                "this UNet (SDXL) needs a pooled text vector, but the connector has no pooled head; build it with "
                "pooled_dim set"
            )
        return cls(tokenizer, language_model, connector, cross_attention_dim=unet_config.cross_attention_dim, **options)

    @classmethod
    def from_pretrained(
        cls,
        language_model: str | os.PathLike,
        connector: str | os.PathLike,
        pipe: Any | None = None,
        torch_dtype: torch.dtype | None = None,
        connector_config: dict[str, int] | None = None,
        **options: Any,
    ) -> LLMAdapterConditioner:
        """Load both parts by name or path; with `pipe`, check them against its UNet.

        `connector_config` gives num_heads / num_blocks for a single-file connector (see `load_connector`).
        """
        tokenizer, model = load_language_model(language_model, torch_dtype)
        loaded_connector = load_connector(connector, torch_dtype, **(connector_config or {}))
        if pipe is not None:
            return cls.from_pipeline(pipe, tokenizer, model, loaded_connector, **options)
        return cls(tokenizer, model, loaded_connector, **options)

    def encode(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
    ) -> Conditioning:
        prompts = as_prompt_list(prompt)
        negatives = as_negative_list(negative_prompt, len(prompts)) or [""] * len(prompts)
        distinct = list(dict.fromkeys(prompts + negatives))
        features = dict(zip(distinct, self._encode_texts(distinct)))
        length = max(features[text].shape[0] for text in distinct)

        def batch(texts: list[str]) -> torch.Tensor:
            rows = [nn.functional.pad(features[text], (0, 0, 0, length - features[text].shape[0])) for text in texts]
            return torch.stack(rows).repeat_interleave(num_images_per_prompt, dim=0)

        positive, negative = batch(prompts), batch(negatives)
        pooled = None
        if self.connector.pooled_head is not None:
            # Placeholders of the right shape: the proxy replaces them with the connector's pooled output.
            pooled = positive.new_zeros(positive.shape[0], self.connector.config.pooled_dim)
        return Conditioning(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=None if pooled is None else torch.zeros_like(pooled),
        )

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """(tokens, hidden) language-model states per text; flexible mode keeps each text's own length."""
        model = hidden_state_model(self.language_model)
        device = self.language_model.device
        if not self.flexible_length:
            tokens = self.tokenizer(
                texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).to(device)
            states = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
            return list(states)
        encoded = []
        for text in texts:
            ids = self.tokenizer(text, max_length=self.max_length, truncation=True, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] == 0:  # e.g. "" for a tokenizer that adds no special tokens: no text at all
                encoded.append(torch.zeros(0, language_model_width(self.language_model), device=device, dtype=self.language_model.dtype))
                continue
            encoded.append(model(input_ids=ids).last_hidden_state[0])
        return encoded

    def at_timestep(
        self, features: torch.Tensor, timestep: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Connector output (B, num_latents, width) at `timestep`; with a pooled head, also the pooled vector."""
        mask = padding_mask(features)
        latents = self.connector(features, timestep, key_padding_mask=mask if mask.any() else None)
        if self.connector.pooled_head is not None:
            return latents, self.connector.pooled_output(latents)
        return latents
