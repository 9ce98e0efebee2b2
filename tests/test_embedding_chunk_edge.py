"""A multi-vector textual-inversion token that would cross a 75-token chunk edge moves whole to the next chunk (A1111)."""

import torch

from condkit import load_conditioner
from condkit.conditioning.chunking import chunk_prompt, multi_vector_groups
from condkit.conditioning.embedding_formats import LearnedEmbedding
from condkit.conditioning.embeddings import expand_prompt, load_embedding
from tiny_models import tiny_sd_pipeline


def pipe_with_three_vector_token():
    pipe = tiny_sd_pipeline()
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    load_embedding(pipe, LearnedEmbedding("<toy>", [vectors]))
    return pipe


def test_the_token_moves_whole_to_the_next_chunk():
    pipe = pipe_with_three_vector_token()
    tokenizer = pipe.tokenizer
    names = tokenizer.convert_tokens_to_ids(["<toy>", "<toy>_1", "<toy>_2"])
    for filler in (73, 74):  # the byte tokenizer: one token per character; 73 + 3 and 74 + 3 cross 75
        chunks = chunk_prompt(tokenizer, expand_prompt("x" * filler + " <toy> end", tokenizer))
        assert chunks.n_chunks == 2
        first, second = chunks.input_ids.tolist()
        assert not set(names) & set(first)  # nothing of the token before the edge
        assert second[1:4] == names  # all three vectors open the next chunk, after BOS
    fitting = chunk_prompt(tokenizer, expand_prompt("x" * 72 + " <toy>", tokenizer))
    assert fitting.n_chunks == 1 and fitting.input_ids[0, 73:76].tolist() == names  # 72 + 3 = 75 fits


def test_groups_are_found_and_other_tokens_chunk_as_before():
    pipe = pipe_with_three_vector_token()
    tokenizer = pipe.tokenizer
    ids = tokenizer(expand_prompt("a <toy> b", tokenizer), add_special_tokens=False).input_ids
    assert multi_vector_groups(tokenizer, ids) == {ids.index(tokenizer.convert_tokens_to_ids("<toy>")): 3}
    plain = "x" * 80
    assert chunk_prompt(tokenizer, plain).input_ids.tolist() == chunk_prompt(tiny_sd_pipeline().tokenizer, plain).input_ids.tolist()


@torch.no_grad()
def test_the_conditioner_encodes_the_moved_token():
    pipe = pipe_with_three_vector_token()
    clip = load_conditioner("clip", pipe)
    cond = clip.encode("x" * 74 + " <toy> end")
    assert cond.prompt_embeds.shape[1] == 2 * 77 and torch.isfinite(cond.prompt_embeds).all()
