"""Stage "unet": a UNet2DConditionModel on 16x16x4 latents, conditioned SD1.x style.

It trains with the shared loop's denoising loss (`condkit.training.loop.train`): the VAE latents
of the pool are encoded once and cached by the loop, epsilon prediction on DDPM scaled_linear
betas as in Stable Diffusion, Min-SNR-5 loss weighting (the loop's snr_gamma, diffusers'
`compute_snr`), AdamW. The frozen text encoder's last_hidden_state (CLIP_POSITIONS tokens) is the
cross-attention context; 10% of captions are replaced by the empty caption so classifier-free
guidance works. diffusers' `EMAModel` keeps an EMA copy of the weights, which is what gets
shipped; its state is part of the method's trainable state, so checkpoints hold it and a resumed
run continues the same average.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

from condkit.conditioning import CLIP_POSITIONS
from condkit.training.loop import TrainingBatch, TrainingMethod, train

from .stage_runner import final_loss, model_device, save_final, stage_config
from .world_data import Pool

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class UnetScale:
    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    attention_head_dim: int
    steps: int
    batch_size: int
    learning_rate: float
    ema_decay: float
    checkpoint_every: int
    layers_per_block: int = 1
    caption_dropout: float = CAPTION_DROPOUT


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def build_unet(scale: UnetScale, cross_attention_dim: int, latent_size: int, latent_channels: int = 4) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in scale.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(scale.attention_levels))
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=scale.channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=scale.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=scale.attention_head_dim,
        norm_num_groups=min(32, scale.channels[0]),
        # The deepest level already has cross-attention blocks; no mid block keeps the shipped
        # folder under 40 MB and each step cheaper.
        mid_block_type=None,
    )


class UnetStage(TrainingMethod):
    """Trains the whole UNet, conditioned on the frozen text encoder; keeps the EMA of its weights.

    Caption dropout draws from the global torch generator, which the loop seeds and checkpoints.
    """

    EMA_PREFIX = "ema."
    EMA_STEP = "ema_optimization_step"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        ema_decay: float,
        caption_dropout: float = CAPTION_DROPOUT,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.ema_decay = ema_decay
        self.caption_dropout = caption_dropout
        self.ema = EMAModel(unet.parameters(), decay=ema_decay, foreach=True)

    def settings(self) -> dict:
        return {"ema_decay": self.ema_decay, "caption_dropout": self.caption_dropout}

    def train(self, mode: bool = True) -> UnetStage:
        super().train(mode)
        self.text_encoder.eval()
        return self

    def prompts_for(self, batch: TrainingBatch) -> list[str]:
        dropped = (torch.rand(len(batch.captions)) < self.caption_dropout).tolist()
        return ["" if drop else caption for caption, drop in zip(batch.captions, dropped)]

    def encoder_hidden_states(self, batch: TrainingBatch, timesteps: torch.Tensor) -> torch.Tensor:
        ids = self.tokenizer(
            self.prompts_for(batch), padding="max_length", truncation=True, max_length=CLIP_POSITIONS,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            return self.text_encoder(input_ids=ids.to(model_device(self.text_encoder))).last_hidden_state

    def after_optimizer_step(self, step: int) -> None:
        self.ema.to(device=model_device(self.unet))  # the loop may have moved the UNet to its device
        self.ema.step(self.unet.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's weights, the EMA's and the EMA's step count: what a resume needs."""
        state = super().trainable_state_dict()
        names = [name for name, _ in self.unet.named_parameters()]
        state.update({self.EMA_PREFIX + name: shadow for name, shadow in zip(names, self.ema.shadow_params)})
        state[self.EMA_STEP] = torch.tensor(self.ema.optimization_step, dtype=torch.int64)
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        step = int(state.pop(self.EMA_STEP))
        names = [name for name, _ in self.unet.named_parameters()]
        shadows = [state.pop(self.EMA_PREFIX + name) for name in names]
        super().load_trainable_state_dict(state)
        self.ema.load_state_dict({"optimization_step": step, "shadow_params": shadows})
        self.ema.to(device=model_device(self.unet))


def train_unet(
    stage_dir: Path,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    pool: Pool,
    scale: UnetScale,
    *,
    seed: int,
) -> dict:
    """Train (or resume) the UNet stage; the EMA weights are saved under stage_dir/final."""
    latent_size = pool.images.shape[-1] // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed)
    unet = build_unet(scale, text_encoder.config.hidden_size, latent_size, vae.config.latent_channels)
    method = UnetStage(unet, tokenizer, text_encoder, scale.ema_decay, scale.caption_dropout)
    config = stage_config(
        stage_dir, steps=scale.steps, batch_size=scale.batch_size, learning_rate=scale.learning_rate,
        checkpoint_every=scale.checkpoint_every, warmup_steps=max(1, scale.steps // 50), weight_decay=0.01,
        seed=seed, snr_gamma=MIN_SNR_GAMMA, vae_batch_size=64,
    )  # fmt: skip
    result = train(method, unet, vae, training_scheduler(), pool, config)
    unet.cpu()
    method.ema.to(device="cpu")
    method.ema.copy_to(unet.parameters())
    report = {"final_loss": final_loss(result), "parameters": sum(p.numel() for p in unet.parameters())}
    save_final(stage_dir, unet)
    return report
