"""Official Long-CLIP checkpoint → Hugging Face folders, checked against a forward pass written from
the OpenAI layout (the reference below never touches transformers)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from condkit.conditioning.long_clip import LongCLIPConditioner, position_count
from condkit.conditioning.long_clip_convert import convert_longclip_checkpoint
from tiny_models import byte_tokenizer, tiny_sd_pipeline, tiny_sdxl_pipeline

VOCAB = 514  # the byte tokenizer: 512 byte symbols, <|startoftext|> 512, <|endoftext|> 513
BOS, EOS = 512, 513
KEEP = 20


class NotATensor:
    """Stands for anything a checkpoint could pickle that needs code to rebuild."""


# --- an official-layout checkpoint and its reference forward pass --------------------------------


def official_checkpoint(width=128, layers=2, positions=248, projection=64, visual=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    def blocks(prefix, w):
        state = {}
        for layer in range(layers):
            p = f"{prefix}{layer}."
            state |= {
                p + "attn.in_proj_weight": randn(3 * w, w, scale=w**-0.5),
                p + "attn.in_proj_bias": randn(3 * w, scale=0.1),
                p + "attn.out_proj.weight": randn(w, w, scale=w**-0.5),
                p + "attn.out_proj.bias": randn(w, scale=0.1),
                p + "ln_1.weight": 1 + randn(w, scale=0.1),
                p + "ln_1.bias": randn(w, scale=0.1),
                p + "ln_2.weight": 1 + randn(w, scale=0.1),
                p + "ln_2.bias": randn(w, scale=0.1),
                p + "mlp.c_fc.weight": randn(4 * w, w, scale=w**-0.5),
                p + "mlp.c_fc.bias": randn(4 * w, scale=0.1),
                p + "mlp.c_proj.weight": randn(w, 4 * w, scale=(4 * w) ** -0.5),
                p + "mlp.c_proj.bias": randn(w, scale=0.1),
            }
        return state

    positional = randn(positions, width, scale=0.5)
    state = {
        "token_embedding.weight": randn(VOCAB, width, scale=0.5),
        "positional_embedding": positional,
        "positional_embedding_res": positional + randn(positions, width, scale=0.5),
        "ln_final.weight": 1 + randn(width, scale=0.1),
        "ln_final.bias": randn(width, scale=0.1),
        "text_projection": randn(width, projection, scale=width**-0.5),
        "logit_scale": torch.tensor(4.6052),
        **blocks("transformer.resblocks.", width),
    }
    if visual:
        vision_width, patch, grid = 128, 8, 4
        state |= {
            "visual.conv1.weight": randn(vision_width, 3, patch, patch, scale=0.1),
            "visual.class_embedding": randn(vision_width, scale=0.5),
            "visual.positional_embedding": randn(grid * grid + 1, vision_width, scale=0.5),
            "visual.ln_pre.weight": 1 + randn(vision_width, scale=0.1),
            "visual.ln_pre.bias": randn(vision_width, scale=0.1),
            "visual.ln_post.weight": 1 + randn(vision_width, scale=0.1),
            "visual.ln_post.bias": randn(vision_width, scale=0.1),
            "visual.proj": randn(vision_width, projection, scale=vision_width**-0.5),
            **blocks("visual.transformer.resblocks.", vision_width),
        }
    return state


def layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps=1e-5)


def residual_blocks(x, state, prefix, heads, mask=None):
    """OpenAI's ResidualAttentionBlock stack: pre-LN, nn.MultiheadAttention on (tokens, batch, width)."""
    width = x.shape[-1]
    layer = 0
    while f"{prefix}{layer}.ln_1.weight" in state:
        p = f"{prefix}{layer}."
        h = layer_norm(x, state, p + "ln_1").transpose(0, 1)
        attended, _ = F.multi_head_attention_forward(
            h, h, h, width, heads,
            state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"], None, None, False, 0.0,
            state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask,
        )  # fmt: skip
        x = x + attended.transpose(0, 1)
        h = F.linear(layer_norm(x, state, p + "ln_2"), state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        layer += 1
    return x


def reference_text(state, ids, heads):
    """Long-CLIP's encode_text: both position tables masked at row 20, causal blocks, EOT-pooled projection."""
    positions = state["positional_embedding"].shape[0]
    first_rows = (torch.arange(positions) < KEEP).float()[:, None]
    table = state["positional_embedding"] * first_rows + state["positional_embedding_res"] * (1 - first_rows)
    n = ids.shape[1]
    x = state["token_embedding.weight"][ids] + table[:n]
    x = residual_blocks(x, state, "transformer.resblocks.", heads, torch.full((n, n), float("-inf")).triu(1))
    x = layer_norm(x, state, "ln_final")
    pooled = x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ state["text_projection"]
    return x, pooled


def reference_image(state, images, heads):
    """OpenAI's VisionTransformer: patch conv, class token, ln_pre, blocks, ln_post on the class token, proj."""
    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, state["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    class_token = state["visual.class_embedding"].expand(images.shape[0], 1, -1)
    x = torch.cat([class_token, x], dim=1) + state["visual.positional_embedding"]
    x = residual_blocks(layer_norm(x, state, "visual.ln_pre"), state, "visual.transformer.resblocks.", heads)
    return x, layer_norm(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]


def token_ids():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 248), generator=generator)
    ids[:, 0] = BOS
    ids[0, 100], ids[0, 101:] = EOS, 0  # Long-CLIP's zero padding
    ids[1, 247] = EOS
    return ids


@pytest.fixture(scope="module")
def checkpoint():
    return official_checkpoint()


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("longclip")
    torch.save(checkpoint, folder / "longclip-tiny.pt")
    return convert_longclip_checkpoint(folder / "longclip-tiny.pt", folder / "out", tokenizer=byte_tokenizer())


# --- numerics -----------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("file_format", ["pt", "safetensors"])
def test_text_encoder_reproduces_the_openai_layout_forward(checkpoint, converted, tmp_path, file_format):
    if file_format == "safetensors":
        save_file(checkpoint, tmp_path / "longclip-tiny.safetensors")
        converted = convert_longclip_checkpoint(tmp_path / "longclip-tiny.safetensors", tmp_path / "out")
    model = CLIPTextModelWithProjection.from_pretrained(converted / "text_encoder")
    assert model.config.max_position_embeddings == 248 and model.config.num_attention_heads == 2
    ids = token_ids()
    hidden, pooled = reference_text(checkpoint, ids, heads=2)
    output = model(ids)
    torch.testing.assert_close(output.last_hidden_state, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.text_embeds, pooled, atol=1e-5, rtol=1e-5)


def test_fine_tuned_position_rows_are_kept(checkpoint, converted):
    model = CLIPTextModelWithProjection.from_pretrained(converted / "text_encoder")
    table = model.text_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(table[:KEEP], checkpoint["positional_embedding"][:KEEP])
    assert torch.equal(table[KEEP:], checkpoint["positional_embedding_res"][KEEP:])
    # The test could tell a converter that copies positional_embedding alone from this one.
    assert not torch.allclose(table[KEEP:], checkpoint["positional_embedding"][KEEP:])


@torch.no_grad()
def test_image_encoder_reproduces_the_openai_vit(checkpoint, converted):
    model = CLIPVisionModelWithProjection.from_pretrained(converted / "image_encoder")
    assert model.config.image_size == 32 and model.config.patch_size == 8
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    hidden, pooled = reference_image(checkpoint, images, heads=2)
    output = model(images)
    torch.testing.assert_close(output.last_hidden_state, hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.image_embeds, pooled, atol=1e-5, rtol=1e-5)


# --- the folder other tools read ----------------------------------------------------------------


def test_weights_use_the_prefixed_layout_of_transformers_4(converted):
    with safe_open(converted / "text_encoder" / "model.safetensors", "pt") as file:
        text_keys = set(file.keys())
    config = CLIPTextConfig.from_pretrained(converted / "text_encoder")
    bare_keys = CLIPTextModel(config).state_dict().keys()
    assert text_keys == {f"text_model.{key}" for key in bare_keys if "position_ids" not in key} | {"text_projection.weight"}
    with safe_open(converted / "image_encoder" / "model.safetensors", "pt") as file:
        assert all(key.startswith("vision_model.") or key == "visual_projection.weight" for key in file.keys())


@torch.no_grad()
def test_plain_clip_text_model_loads_the_text_part(checkpoint, converted):
    model = CLIPTextModel.from_pretrained(converted / "text_encoder")
    hidden, _ = reference_text(checkpoint, token_ids(), heads=2)
    torch.testing.assert_close(model(token_ids()).last_hidden_state, hidden, atol=1e-5, rtol=1e-5)


def test_tokenizer_and_summary(converted):
    tokenizer = CLIPTokenizer.from_pretrained(converted / "tokenizer")
    assert tokenizer.model_max_length == 248
    assert len(tokenizer("a red circle", padding="max_length").input_ids) == 248
    summary = json.loads((converted / "longclip.json").read_text())
    assert summary == {"source": "longclip-tiny.pt", "positions": 248, "keep": 20, "logit_scale": pytest.approx(4.6052)}


def test_checkpoint_without_text_projection_gives_a_prefixed_clip_text_model(checkpoint, tmp_path):
    state = {key: value for key, value in checkpoint.items() if key != "text_projection" and not key.startswith("visual.")}
    torch.save(state, tmp_path / "no-projection.pt")
    out = convert_longclip_checkpoint(tmp_path / "no-projection.pt", tmp_path / "out")
    assert json.loads((out / "text_encoder" / "config.json").read_text())["architectures"] == ["CLIPTextModel"]
    assert not (out / "image_encoder").exists()
    with safe_open(out / "text_encoder" / "model.safetensors", "pt") as file:
        assert all(key.startswith("text_model.") for key in file.keys())
    model = CLIPTextModel.from_pretrained(out / "text_encoder")
    with torch.no_grad():
        hidden, _ = reference_text(checkpoint, token_ids(), heads=2)
        torch.testing.assert_close(model(token_ids()).last_hidden_state, hidden, atol=1e-5, rtol=1e-5)


# --- into a pipeline ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_for_tiny_pipelines(tmp_path_factory):
    """Width 32 matches the tiny pipelines' CLIP-L slot; 32 is below OpenAI's 64-wide heads, so 2 heads."""
    folder = tmp_path_factory.mktemp("longclip32")
    torch.save(official_checkpoint(width=32, projection=32, visual=False, seed=3), folder / "longclip-32.pt")
    return convert_longclip_checkpoint(folder / "longclip-32.pt", folder / "out", tokenizer=byte_tokenizer(), num_heads=2)


@torch.no_grad()
def test_sd_pipeline_with_a_converted_long_clip(converted_for_tiny_pipelines):
    pipe = tiny_sd_pipeline()
    original = pipe.text_encoder
    conditioner = LongCLIPConditioner.from_pipeline(pipe, converted_for_tiny_pipelines, pad_token="zero")
    assert pipe.text_encoder is original and position_count(original) == 77

    prompt = "a red circle left of a blue square"
    cond = conditioner.encode(prompt)
    ids = conditioner.tokenizers[0](prompt, padding="max_length", return_tensors="pt").input_ids
    assert ids[0, -1] == 0  # zero padding, as Long-CLIP
    loaded = CLIPTextModel.from_pretrained(converted_for_tiny_pipelines / "text_encoder")
    assert cond.prompt_embeds.shape[1] == 77  # the window's states, cut at the first multiple of 77
    assert torch.equal(cond.prompt_embeds, loaded(ids).last_hidden_state[:, :77])
    images = pipe(**cond.kwargs(), num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@torch.no_grad()
def test_sdxl_takes_the_converted_model_as_its_first_encoder(converted_for_tiny_pipelines):
    pipe = tiny_sdxl_pipeline()
    conditioner = LongCLIPConditioner.from_pipeline(pipe, converted_for_tiny_pipelines)
    assert [position_count(e) for e in conditioner.text_encoders] == [248, 248]
    cond = conditioner.encode("a red circle")
    assert cond.prompt_embeds.shape == (1, 77, 64) and cond.pooled_prompt_embeds.shape == (1, 32)


def test_a_folder_without_a_text_encoder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Long-CLIP text encoder in .*expected text_encoder/config.json"):
        LongCLIPConditioner.from_pipeline(tiny_sd_pipeline(), tmp_path)


# --- bad input ----------------------------------------------------------------------------------


def _convert(state, tmp_path, **options):
    torch.save(state, tmp_path / "bad.pt")
    return convert_longclip_checkpoint(tmp_path / "bad.pt", tmp_path / "out", **options)


def test_plain_clip_checkpoints_are_refused(checkpoint, tmp_path):
    without_res = {key: value for key, value in checkpoint.items() if key != "positional_embedding_res"}
    with pytest.raises(ValueError, match="not a Long-CLIP checkpoint in the OpenAI layout: missing positional_embedding_res$"):
        _convert(without_res, tmp_path)
    short = checkpoint | {"positional_embedding": torch.zeros(77, 128), "positional_embedding_res": torch.zeros(77, 128)}
    with pytest.raises(ValueError, match="positional_embedding has 77 rows; a Long-CLIP checkpoint has more than 77"):
        _convert(short, tmp_path)


def test_wrong_shapes_and_missing_layers_are_named(checkpoint, tmp_path):
    wrong = checkpoint | {"transformer.resblocks.1.mlp.c_proj.weight": torch.zeros(128, 256)}
    with pytest.raises(ValueError, match=r"transformer.resblocks.1.mlp.c_proj.weight has shape \(128, 256\); expected \(128, 512\)"):
        _convert(wrong, tmp_path)
    gap = {key: value for key, value in checkpoint.items() if not key.startswith("transformer.resblocks.0.")}
    with pytest.raises(ValueError, match=r"missing transformer.resblocks.0.attn.in_proj_weight, .* and 9 more"):
        _convert(gap, tmp_path)


def test_heads_must_be_given_for_widths_openai_never_used(tmp_path):
    with pytest.raises(ValueError, match="width 32 is not a multiple of 64; pass num_heads explicitly"):
        _convert(official_checkpoint(width=32, visual=False), tmp_path)


def test_pickles_that_need_code_are_refused(tmp_path):
    torch.save({"weights": NotATensor()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="needs arbitrary code to unpickle; refusing it"):
        convert_longclip_checkpoint(tmp_path / "code.pt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        convert_longclip_checkpoint(tmp_path / "missing.pt", tmp_path / "out")
