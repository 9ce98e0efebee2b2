"""Textual-inversion files: every format read and written, loaded like diffusers loads them, refusals."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline

from condkit.conditioning.clip import CLIPConditioner
from condkit.conditioning.embedding_formats import LearnedEmbedding, detect_format, read_embedding, write_embedding
from condkit.conditioning.embeddings import (
    _expand_by_text,
    _multi_vector_followers,
    expand_prompt,
    extract_embedding,
    fix_pooled_eos,
    load_embedding,
)

WIDTH = 32  # both text encoders of the tiny pipelines
TOKEN = "<cat-toy>"
PROMPT = "a photo of <cat-toy> on a table"


def sd_embedding(n_vectors: int = 3, token: str = TOKEN, seed: int = 1) -> LearnedEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return LearnedEmbedding(token, [torch.randn(n_vectors, WIDTH, generator=generator)])


def sdxl_embedding(n_vectors: int = 2, token: str = TOKEN, seed: int = 2) -> LearnedEmbedding:
    generator = torch.Generator().manual_seed(seed)
    return LearnedEmbedding(token, [torch.randn(n_vectors, WIDTH, generator=generator) for _ in range(2)])


def rows(pipe, names: list[str], encoder: int = 1) -> torch.Tensor:
    tokenizer = pipe.tokenizer if encoder == 1 else pipe.tokenizer_2
    text_encoder = pipe.text_encoder if encoder == 1 else pipe.text_encoder_2
    return text_encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(names)]


# ------------------------------------------------------------------ diffusers reads what we write


@pytest.mark.parametrize(
    "format, filename",
    [("diffusers", "learned_embeds.safetensors"), ("diffusers", "learned_embeds.bin"), ("a1111", "cat-toy.pt")],
)
def test_diffusers_loader_and_ours_give_identical_rows_and_prompt_embeds(tmp_path, format, filename):
    embedding = sd_embedding(n_vectors=3)
    (path,) = write_embedding(embedding, tmp_path / filename, format)
    assert detect_format(path) == format

    theirs, ours = tiny_sd_pipeline(0), tiny_sd_pipeline(0)
    theirs.load_textual_inversion(str(path))
    added = load_embedding(ours, path)

    assert added == [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    assert ours.tokenizer.convert_tokens_to_ids(added) == theirs.tokenizer.convert_tokens_to_ids(added)
    assert torch.equal(rows(ours, added), embedding.vectors[0])
    assert torch.equal(rows(theirs, added), embedding.vectors[0])
    assert torch.equal(ours.text_encoder.get_input_embeddings().weight, theirs.text_encoder.get_input_embeddings().weight)

    their_embeds, _ = theirs.encode_prompt(PROMPT, "cpu", 1, False)
    our_embeds, _ = ours.encode_prompt(PROMPT, "cpu", 1, False)
    assert torch.equal(our_embeds, their_embeds)
    # CLIPConditioner expands multi-vector tokens itself (expanding twice changes nothing).
    conditioner = CLIPConditioner.from_pipeline(ours)
    assert torch.equal(conditioner.encode(PROMPT).prompt_embeds, their_embeds)
    assert torch.equal(conditioner.encode(expand_prompt(PROMPT, ours.tokenizer)).prompt_embeds, their_embeds)


def test_diffusers_sdxl_two_file_layout_loads_like_diffusers_into_both_encoders(tmp_path):
    embedding = sdxl_embedding(n_vectors=2)
    first, second = write_embedding(embedding, tmp_path, "diffusers_sdxl")
    assert (first.name, second.name) == ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
    assert detect_format(tmp_path) == detect_format(first) == detect_format(second) == "diffusers_sdxl"

    theirs, ours = tiny_sdxl_pipeline(0), tiny_sdxl_pipeline(0)
    theirs.load_textual_inversion(str(first), text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(str(second), text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    added = load_embedding(ours, tmp_path)

    for encoder in (1, 2):
        assert torch.equal(rows(ours, added, encoder), embedding.vectors[encoder - 1])
        assert torch.equal(rows(theirs, added, encoder), embedding.vectors[encoder - 1])
    their_tensors = theirs.encode_prompt(PROMPT, device="cpu", negative_prompt="blurry <cat-toy>")
    our_tensors = ours.encode_prompt(PROMPT, device="cpu", negative_prompt="blurry <cat-toy>")
    for theirs_tensor, ours_tensor in zip(their_tensors, our_tensors):
        assert torch.equal(ours_tensor, theirs_tensor)


# ------------------------------------------------------------------ our reader: every format round-trips


@pytest.mark.parametrize(
    "format, filename, sdxl",
    [
        ("diffusers", "learned_embeds.safetensors", False),
        ("diffusers", "learned_embeds.bin", False),
        ("a1111", "anything.pt", False),
        ("kohya", "kohya-style.safetensors", False),
        ("kohya", "kohya-style.pt", False),
        ("clip_l", "pivotal.safetensors", False),
        ("sdxl_single_file", "civitai-style.safetensors", True),
        ("sdxl_single_file", "civitai-style.pt", True),
        ("diffusers_sdxl", "learned_embeds.safetensors", True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_format_round_trips_bit_exactly(tmp_path, format, filename, sdxl, dtype):
    embedding = sdxl_embedding() if sdxl else sd_embedding()
    embedding = LearnedEmbedding(embedding.token, [v.to(dtype) for v in embedding.vectors], step=1500)
    written = write_embedding(embedding, tmp_path / filename, format)

    assert detect_format(written[0]) == format
    back = read_embedding(written[0])
    names_the_token = format in ("diffusers", "diffusers_sdxl", "a1111")
    assert back.token == (TOKEN if names_the_token else Path(filename).stem)
    assert len(back.vectors) == len(embedding.vectors)
    for read, original in zip(back.vectors, embedding.vectors):
        assert read.dtype == dtype and torch.equal(read, original)
    assert back.step == (1500 if format == "a1111" else None)
    assert read_embedding(written[0], token="<renamed>").token == "<renamed>"


def test_a_second_file_under_another_token_is_not_taken_for_the_sdxl_pair(tmp_path):
    (first,) = write_embedding(sd_embedding(token="<v1>"), tmp_path / "style.safetensors", "diffusers")
    (second,) = write_embedding(sd_embedding(token="<v2>"), tmp_path / "style_2.safetensors", "diffusers")
    assert detect_format(first) == detect_format(second) == "diffusers"
    assert read_embedding(second).token == "<v2>"


def test_a_tokenizer_shared_by_two_encoders_gets_each_token_once():
    pipe = tiny_sdxl_pipeline(0)
    embedding = sdxl_embedding(n_vectors=2)
    size = len(pipe.tokenizer)

    load_embedding(([pipe.tokenizer, pipe.tokenizer], [pipe.text_encoder, pipe.text_encoder_2]), embedding)

    assert len(pipe.tokenizer) == size + 2
    ids = pipe.tokenizer.convert_tokens_to_ids(embedding.token_names)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], embedding.vectors[0])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids], embedding.vectors[1])


def test_sdxl_single_file_keys_are_clip_l_then_clip_g_and_load_into_encoders_1_and_2(tmp_path):
    clip_l, clip_g = torch.full((2, WIDTH), 1.0), torch.full((2, WIDTH), 2.0)
    path = tmp_path / "style.safetensors"
    safetensors.torch.save_file({"clip_g": clip_g, "clip_l": clip_l}, str(path))  # key order must not matter
    pipe = tiny_sdxl_pipeline(0)

    added = load_embedding(pipe, path)

    assert added == ["style", "style_1"]
    assert torch.equal(rows(pipe, added, encoder=1), clip_l)
    assert torch.equal(rows(pipe, added, encoder=2), clip_g)
    back = extract_embedding(pipe, "style")
    assert torch.equal(back.vectors[0], clip_l) and torch.equal(back.vectors[1], clip_g)


def test_original_textual_inversion_parameter_dict_file_reads_without_arbitrary_unpickling(tmp_path):
    vectors = torch.randn(2, WIDTH)
    path = tmp_path / "old-style.pt"
    parameters = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": parameters}, path)

    embedding = read_embedding(path)

    assert detect_format(path) == "a1111"
    assert embedding.token == "old-style" and torch.equal(embedding.vectors[0], vectors)
    assert not embedding.vectors[0].requires_grad


def test_extract_after_load_writes_back_the_same_file_contents(tmp_path):
    pipe = tiny_sd_pipeline(0)
    embedding = sd_embedding(n_vectors=2)
    load_embedding(CLIPConditioner.from_pipeline(pipe), embedding)  # a conditioner is a valid target too

    extracted = extract_embedding(pipe, TOKEN)
    (path,) = write_embedding(extracted, tmp_path / "learned_embeds.safetensors")

    assert torch.equal(read_embedding(path).vectors[0], embedding.vectors[0])


# ------------------------------------------------------------------ prompt expansion


def loaded_sd_pipeline(*embeddings: LearnedEmbedding):
    pipe = tiny_sd_pipeline(0)
    for embedding in embeddings:
        load_embedding(pipe, embedding)
    return pipe


@pytest.mark.parametrize(
    "prompt",
    [PROMPT, "<cat-toy>", "(<cat-toy>:1.2), two <cat-toy> and <dog>", "nothing learned here", "x<cat-toy>y"],
)
def test_expand_prompt_matches_diffusers_maybe_convert_prompt(prompt):
    pipe = loaded_sd_pipeline(sd_embedding(3), sd_embedding(1, token="<dog>"))
    assert expand_prompt(prompt, pipe.tokenizer) == pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    assert _expand_by_text(prompt, _multi_vector_followers(pipe.tokenizer)) == expand_prompt(prompt, pipe.tokenizer)


def test_expand_prompt_is_idempotent_and_takes_lists():
    pipe = loaded_sd_pipeline(sd_embedding(3))
    once = expand_prompt(PROMPT, pipe.tokenizer)
    assert once == "a photo of <cat-toy> <cat-toy>_1 <cat-toy>_2 on a table"
    assert expand_prompt(once, pipe.tokenizer) == once
    assert _expand_by_text(once, _multi_vector_followers(pipe.tokenizer)) == once
    assert expand_prompt([PROMPT, "plain"], pipe.tokenizer) == [once, "plain"]


def test_expand_prompt_finds_tokens_the_way_the_tokenizer_does_even_where_diffusers_does_not():
    # CLIP lowercases text before matching added tokens, so "<Cat-Toy>" in a prompt is the token;
    # diffusers' maybe_convert_prompt compares the lowercased pieces with the stored name and misses it.
    pipe = loaded_sd_pipeline(sd_embedding(3, token="<Cat-Toy>"))
    expanded = expand_prompt("a photo of <CAT-TOY>", pipe.tokenizer)

    ids = pipe.tokenizer(expanded, add_special_tokens=False).input_ids
    assert ids[-3:] == pipe.tokenizer.convert_tokens_to_ids(["<Cat-Toy>", "<Cat-Toy>_1", "<Cat-Toy>_2"])
    assert pipe.maybe_convert_prompt("a photo of <Cat-Toy>", pipe.tokenizer) == "a photo of <Cat-Toy>"


# ------------------------------------------------------------------ pooled output with a legacy CLIP config


def make_legacy_eos_config(text_encoder) -> None:
    """What a CLIP text config from before transformers PR #24773 looks like once loaded."""
    text_encoder.config.eos_token_id = 2
    text_encoder.text_model.eos_token_id = 2


def pooled_at_eos(pipe, prompt: str) -> torch.Tensor:
    """text_embeds computed by hand at the first EOS position: what SDXL's pooled prompt embeds should be."""
    ids = pipe.tokenizer_2(
        pipe.maybe_convert_prompt(prompt, pipe.tokenizer_2), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    eos_position = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
    with torch.no_grad():
        hidden = pipe.text_encoder_2(ids).last_hidden_state
        return pipe.text_encoder_2.text_projection(hidden[:, eos_position])


def test_added_tokens_do_not_hijack_the_pooled_output_of_a_legacy_clip_config():
    embedding = sdxl_embedding(n_vectors=1)
    reference = tiny_sdxl_pipeline(0)
    load_embedding(reference, embedding)
    expected = pooled_at_eos(reference, PROMPT)

    legacy_with_diffusers = tiny_sdxl_pipeline(0)
    make_legacy_eos_config(legacy_with_diffusers.text_encoder_2)
    for tokenizer, encoder, vectors in (
        (legacy_with_diffusers.tokenizer, legacy_with_diffusers.text_encoder, embedding.vectors[0]),
        (legacy_with_diffusers.tokenizer_2, legacy_with_diffusers.text_encoder_2, embedding.vectors[1]),
    ):
        legacy_with_diffusers.load_textual_inversion({TOKEN: vectors}, tokenizer=tokenizer, text_encoder=encoder)
    hijacked = legacy_with_diffusers.encode_prompt(PROMPT, device="cpu")[2]
    assert not torch.allclose(hijacked, expected)  # the bug being guarded against is real

    legacy_with_ours = tiny_sdxl_pipeline(0)
    make_legacy_eos_config(legacy_with_ours.text_encoder_2)
    load_embedding(legacy_with_ours, embedding)
    pooled = legacy_with_ours.encode_prompt(PROMPT, device="cpu")[2]

    assert legacy_with_ours.text_encoder_2.config.eos_token_id == legacy_with_ours.tokenizer_2.eos_token_id
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert torch.allclose(pooled, reference.encode_prompt(PROMPT, device="cpu")[2], atol=1e-6)


def test_fix_pooled_eos_leaves_a_current_config_alone():
    pipe = tiny_sdxl_pipeline(0)
    assert not fix_pooled_eos(pipe.text_encoder_2, pipe.tokenizer_2)
    make_legacy_eos_config(pipe.text_encoder_2)
    assert fix_pooled_eos(pipe.text_encoder_2, pipe.tokenizer_2)
    assert pipe.text_encoder_2.text_model.eos_token_id == pipe.tokenizer_2.eos_token_id


# ------------------------------------------------------------------ refusals


def vocabulary_state(pipe) -> list[tuple[int, tuple[int, ...]]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return [(len(tok), tuple(enc.get_input_embeddings().weight.shape)) for tok, enc in pairs]


def test_a_token_already_in_the_vocabulary_is_refused():
    pipe = loaded_sd_pipeline(sd_embedding(2))
    with pytest.raises(ValueError, match=r"token '<cat-toy>' already exists in tokenizer 1"):
        load_embedding(pipe, sd_embedding(1))
    with pytest.raises(ValueError, match=r"token 'a' already exists in tokenizer 1 \(as 'a'\)"):
        load_embedding(pipe, sd_embedding(1, token="a"))  # ordinary text that is already one token


def test_a_refused_sdxl_embedding_changes_neither_encoder():
    pipe = tiny_sdxl_pipeline(0)
    pipe.tokenizer_2.add_tokens([TOKEN])
    pipe.text_encoder_2.resize_token_embeddings(len(pipe.tokenizer_2))
    before = vocabulary_state(pipe)
    with pytest.raises(ValueError, match="already exists in tokenizer 2"):
        load_embedding(pipe, sdxl_embedding())
    assert vocabulary_state(pipe) == before


def test_a_wrong_width_names_both_widths_and_changes_nothing():
    pipe = tiny_sd_pipeline(0)
    before = vocabulary_state(pipe)
    wide = LearnedEmbedding(TOKEN, [torch.randn(1, 768)])
    with pytest.raises(ValueError, match=r"'<cat-toy>' is 768 wide for text encoder 1, but .* are 32 wide"):
        load_embedding(pipe, wide)
    sdxl = tiny_sdxl_pipeline(0)
    with pytest.raises(ValueError, match=r"is 40 wide for text encoder 2, but .* are 32 wide"):
        load_embedding(sdxl, LearnedEmbedding(TOKEN, [torch.randn(1, WIDTH), torch.randn(1, 40)]))
    assert vocabulary_state(pipe) == before


def test_an_embedding_for_another_number_of_encoders_is_refused():
    with pytest.raises(ValueError, match=r"vectors for 1 text encoder\(s\), but the target has 2"):
        load_embedding(tiny_sdxl_pipeline(0), sd_embedding())
    with pytest.raises(ValueError, match=r"format 'kohya' holds vectors for 1 text encoder\(s\), but .* has 2"):
        write_embedding(sdxl_embedding(), "unused.safetensors", "kohya")


def test_an_unknown_format_names_what_was_found(tmp_path):
    path = tmp_path / "mystery.safetensors"
    safetensors.torch.save_file({"foo": torch.zeros(1, 4), "bar": torch.zeros(1, 4)}, str(path))
    with pytest.raises(ValueError, match=r"unknown textual-inversion format .*found keys \['bar', 'foo'\]"):
        detect_format(path)
    listed = tmp_path / "a-list.pt"
    torch.save([torch.zeros(1, 4)], listed)
    with pytest.raises(ValueError, match="found a list"):
        read_embedding(listed)
    text = tmp_path / "notes.pt"
    text.write_text("not an embedding")
    with pytest.raises(ValueError, match="neither a safetensors file nor a torch pickle"):
        read_embedding(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_embedding(tmp_path / "missing.pt")


class CodeRunningPayload:
    """Pickles as "call builtins.exec(code)": loading it with plain pickle runs the code."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return (builtins.exec, (self.code,))


@pytest.mark.parametrize("zip_container", [True, False], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_without_running_its_code(tmp_path, zip_container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "innocent.pt"
    payload = {"string_to_param": {"*": CodeRunningPayload(marker)}, "name": "innocent"}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_container)

    with pytest.raises(ValueError, match=r"refusing to load .*innocent\.pt: it needs arbitrary unpickling \((builtins\.)?exec\)"):
        read_embedding(path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_embedding(tiny_sd_pipeline(0), path)
    assert not marker.exists()

    torch.load(path, weights_only=False)  # the control: an unguarded load does run it
    assert marker.read_text() == "ran"


# ------------------------------------------------------------------ writing


def test_writing_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    write_embedding(sd_embedding(seed=1), path)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        write_embedding(sd_embedding(seed=2), path)
    assert torch.equal(read_embedding(path).vectors[0], sd_embedding(seed=1).vectors[0])

    write_embedding(sd_embedding(seed=2), path, overwrite=True)
    assert torch.equal(read_embedding(path).vectors[0], sd_embedding(seed=2).vectors[0])


def test_the_two_file_layout_refuses_before_writing_either_file(tmp_path):
    (tmp_path / "learned_embeds_2.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="learned_embeds_2.safetensors already exists"):
        write_embedding(sdxl_embedding(), tmp_path, "diffusers_sdxl")
    assert not (tmp_path / "learned_embeds.safetensors").exists()
    assert (tmp_path / "learned_embeds_2.safetensors").read_bytes() == b"keep me"


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "emb.safetensors"
    write_embedding(sd_embedding(seed=1), path, "kohya")
    original = path.read_bytes()

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_embedding(sd_embedding(seed=2), path, "kohya", overwrite=True)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["emb.safetensors"]


def test_write_refuses_a1111_in_safetensors_and_unknown_suffixes_and_formats(tmp_path):
    with pytest.raises(ValueError, match=r"format 'a1111' is a torch pickle; got 'x.safetensors'"):
        write_embedding(sd_embedding(), tmp_path / "x.safetensors", "a1111")
    with pytest.raises(ValueError, match=r"cannot tell the container of 'x.txt'"):
        write_embedding(sd_embedding(), tmp_path / "x.txt")
    with pytest.raises(ValueError, match=r"unknown embedding format 'comfy'"):
        write_embedding(sd_embedding(), tmp_path / "x.pt", "comfy")
    assert list(tmp_path.iterdir()) == []


def test_default_write_formats(tmp_path):
    assert detect_format(write_embedding(sd_embedding(), tmp_path / "a.pt")[0]) == "a1111"
    assert detect_format(write_embedding(sd_embedding(), tmp_path / "b.safetensors")[0]) == "diffusers"
    assert detect_format(write_embedding(sdxl_embedding(), tmp_path / "c.safetensors")[0]) == "sdxl_single_file"


def test_embedding_validation_names_the_bad_value():
    with pytest.raises(ValueError, match=r"token must be a non-empty string .* got ' <x>'"):
        LearnedEmbedding(" <x>", [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"has \[2, 3\] vectors for its text encoders"):
        LearnedEmbedding("<x>", [torch.zeros(2, 4), torch.zeros(3, 8)])
    with pytest.raises(ValueError, match="contain NaN or inf"):
        LearnedEmbedding("<x>", [torch.tensor([[0.0, float("nan")]])])
    assert LearnedEmbedding("<x>", torch.zeros(4)).vectors[0].shape == (1, 4)
