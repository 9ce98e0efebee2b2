"""AUTOMATIC1111 prompt emphasis parsing: documented examples, each rule, and properties.

Expected weights are exact: they are written as the products the web UI computes, in its order
(innermost bracket first, starting from 1.0), so a last-bit difference fails the test.
"""

import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condkit.conditioning.prompt_syntax import (
    BREAK,
    WeightedRun,
    has_weights,
    parse_prompt,
    plain_text,
)

UP = 1.1
DOWN = 1 / 1.1


def runs(*pairs: tuple[str, float] | WeightedRun) -> list[WeightedRun]:
    return [pair if isinstance(pair, WeightedRun) else WeightedRun(*pair) for pair in pairs]


A1111_DOCUMENTED_EXAMPLES = [
    ("normal text", runs(("normal text", 1.0))),
    ("an (important) word", runs(("an ", 1.0), ("important", 1.1), (" word", 1.0))),
    ("(unbalanced", runs(("unbalanced", 1.1))),
    ("\\(literal\\]", runs(("(literal]", 1.0))),
    ("(unnecessary)(parens)", runs(("unnecessaryparens", 1.1))),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        runs(
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ),
    ),
    (
        "a (very beautiful:1.5) [sunset] (((photo)))",
        runs(("a ", 1.0), ("very beautiful", 1.5), (" ", 1.0), ("sunset", DOWN), (" ", 1.0), ("photo", UP * UP * UP)),
    ),
    ("\\(literal\\)", runs(("(literal)", 1.0))),
    ("a BREAK b", runs(("a", 1.0), BREAK, ("b", 1.0))),
    ("(a:1.2) BREAK [b]", runs(("a", 1.2), ("", 1.0), BREAK, ("", 1.0), ("b", DOWN))),
]

EMPHASIS = [
    ("", runs(("", 1.0))),
    ("(x)", runs(("x", UP))),
    ("[x]", runs(("x", DOWN))),
    ("((x))", runs(("x", UP * UP))),
    ("[[x]]", runs(("x", DOWN * DOWN))),
    ("([x])", runs(("x", DOWN * UP))),
    ("a (b [c] d) e", runs(("a ", 1.0), ("b ", UP), ("c", DOWN * UP), (" d", UP), (" e", 1.0))),
]

EXPLICIT_WEIGHTS = [
    ("(x:1.3)", runs(("x", 1.3))),
    ("(x:-0.5)", runs(("x", -0.5))),
    ("(x:.5)", runs(("x", 0.5))),
    ("(x:+2)", runs(("x", 2.0))),
    ("(x:3.)", runs(("x", 3.0))),
    ("(x: 2 )", runs(("x", 2.0))),
    ("(x:0)", runs(("x", 0.0))),
    ("((x:1.3))", runs(("x", 1.3 * UP))),
    ("[(x:2)]", runs(("x", 2.0 * DOWN))),
    ("(a (b:2) c:3)", runs(("a ", 3.0), ("b", 2.0 * 3.0), (" c", 3.0))),
    ("a:b", runs(("a:b", 1.0))),
    ("x:1.2)", runs(("x:1.2)", 1.0))),
    ("[x:1.2]", runs(("x:1.2", DOWN))),
    ("(x:1.2", runs(("x:1.2", UP))),
    ("(x:abc)", runs(("x:abc", UP))),
    # The web UI raises ValueError on these; a weight that is not a number is read as text.
    ("(x:1.2.3)", runs(("x:1.2.3", UP))),
    ("(x:.)", runs(("x:.", UP))),
]

ESCAPES = [
    ("\\\\", runs(("\\", 1.0))),
    ("\\[x\\]", runs(("[x]", 1.0))),
    ("(\\))", runs((")", UP))),
    ("a\\b", runs(("ab", 1.0))),
    ("\\(x:1.5\\)", runs(("(x:1.5)", 1.0))),
    # A lone backslash leaves an empty piece at weight 1, as in the web UI.
    ("(a:2)\\", runs(("a", 2.0), ("", 1.0))),
]

UNBALANCED = [
    ("((a)", runs(("a", UP * UP))),
    ("[a", runs(("a", DOWN))),
    ("a (b", runs(("a ", 1.0), ("b", UP))),
    # Open round brackets are closed first, then square ones.
    ("(a [b", runs(("a ", UP), ("b", UP * DOWN))),
    ("([(x:1.3)", runs(("x", 1.3 * UP * DOWN))),  # the other order gives 1.3000000000000003
    ("a)b", runs(("a)b", 1.0))),
    ("a]b", runs(("a]b", 1.0))),
    ("(a]b)", runs(("a]b", UP))),
    ("[a)b]", runs(("a)b", DOWN))),
    ("()", runs(("", 1.0))),
    ("a[]b", runs(("ab", 1.0))),
]

BREAKS = [
    ("BREAK", runs(("", 1.0), BREAK, ("", 1.0))),
    ("a\n BREAK\tb", runs(("a", 1.0), BREAK, ("b", 1.0))),
    ("a,BREAK,b", runs(("a,", 1.0), BREAK, (",b", 1.0))),
    ("a BREAK BREAK b", runs(("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0))),
    ("(a)BREAK", runs(("a", UP), ("", 1.0), BREAK, ("", 1.0))),
    ("aBREAK b", runs(("aBREAK b", 1.0))),
    ("a BREAKb", runs(("a BREAKb", 1.0))),
    ("a BREAK_b", runs(("a BREAK_b", 1.0))),
    ("a break b", runs(("a break b", 1.0))),
    ("a Break b", runs(("a Break b", 1.0))),
    # Inside brackets the marker is multiplied, and the web UI then reads it as text.
    ("(a BREAK b)", runs(("a", UP), ("BREAK", -1.0 * UP), ("b", UP))),
]

MERGING = [
    ("(a)(b)", runs(("ab", UP))),
    ("a (b:1) c", runs(("a b c", 1.0))),
    ("(a:1.1)(b)", runs(("ab", 1.1))),
    ("[(a)]b", runs(("ab", 1.0))),
    # 1.21 and 1.1 * 1.1 differ in the last bit, so they stay apart.
    ("(a:1.21)((b))", runs(("a", 1.21), ("b", UP * UP))),
]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    A1111_DOCUMENTED_EXAMPLES + EMPHASIS + EXPLICIT_WEIGHTS + ESCAPES + UNBALANCED + BREAKS + MERGING,
)
def test_parse_prompt(prompt: str, expected: list[WeightedRun]) -> None:
    assert parse_prompt(prompt) == expected


def test_break_marker_is_recognised_only_as_the_exact_pair() -> None:
    assert BREAK.is_break
    assert WeightedRun("BREAK", -1).is_break
    assert not WeightedRun("BREAK", -1.1).is_break
    assert not WeightedRun("BREAK", 1.0).is_break
    assert not WeightedRun("break", -1.0).is_break
    assert [run.is_break for run in parse_prompt("(a BREAK b)")] == [False, False, False]
    assert [run.is_break for run in parse_prompt("a BREAK b")] == [False, True, False]


def test_weights_saturate_instead_of_overflowing() -> None:
    assert parse_prompt("(" * 8000 + "a") == runs(("a", sys.float_info.max))
    assert parse_prompt("(a:" + "9" * 400 + ")") == runs(("a", sys.float_info.max))
    huge = "9" * 200
    assert parse_prompt(f"((a:-{huge}):{huge})") == runs(("a", -sys.float_info.max))
    (faded,) = parse_prompt("[" * 8000 + "a")
    assert 0.0 <= faded.weight < 1e-300


def test_parse_prompt_rejects_non_text() -> None:
    with pytest.raises(TypeError, match="prompt must be a str, got NoneType"):
        parse_prompt(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt", "expected_plain", "expected_has_weights"),
    [
        ("a photo of a cat", "a photo of a cat", False),
        ("\\(literal\\) and a:b", "(literal) and a:b", False),
        ("(a:1) [(b)]", "a b", False),
        ("a (cat) photo", "a cat photo", True),
        ("[cat]", "cat", True),
        ("(x:-1)", "x", True),
        ("a BREAK b", "a b", True),
        # Only a weight on no text: nothing to weight.
        ("x (\\", "x ", False),
        ("", "", False),
    ],
)
def test_plain_text_and_has_weights(prompt: str, expected_plain: str, expected_has_weights: bool) -> None:
    parsed = parse_prompt(prompt)
    assert plain_text(parsed) == expected_plain
    assert has_weights(parsed) is expected_has_weights


def test_plain_text_break_separator() -> None:
    assert plain_text(parse_prompt("a BREAK b BREAK c"), break_separator="\n") == "a\nb\nc"


# Properties over random strings.

SYNTAX_RICH_PIECES = st.sampled_from(
    [*"()[]:\\ .-+0123456789abcxyz,_\t\n", "BREAK", " BREAK ", "\\(", "\\]", ":1.2)", ": -0.5 )", ":.5)", ":1.2.3)"]
)
SYNTAX_RICH_PROMPTS = st.one_of(
    st.lists(SYNTAX_RICH_PIECES, max_size=40).map("".join),
    st.text(max_size=40),
)

# Every character that parsing can consume: syntax, the parts of an explicit weight, whitespace
# (around BREAK and weights) and the letters of BREAK.
_CONSUMABLE = frozenset("\\()[]:.+-BREAK")


def characters_parsing_cannot_remove(text: str) -> str:
    return "".join(c for c in text if c not in _CONSUMABLE and not c.isspace() and not c.isdecimal())


@settings(max_examples=3000, deadline=None)
@given(SYNTAX_RICH_PROMPTS)
def test_parsing_any_string_keeps_its_text_and_finite_weights(prompt: str) -> None:
    parsed = parse_prompt(prompt)

    assert parsed, "there is always at least one run"
    assert all(isinstance(run.text, str) and math.isfinite(run.weight) for run in parsed)
    assert all(left.weight != right.weight for left, right in zip(parsed, parsed[1:])), "equal neighbours merge"
    # Each input character either lands, in order, in exactly one run's text or is consumed as
    # syntax; only the characters filtered out here can be consumed.
    text = "".join(run.text for run in parsed if not run.is_break)
    assert characters_parsing_cannot_remove(text) == characters_parsing_cannot_remove(prompt)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\\()[]"), max_size=40).filter(lambda t: "BREAK" not in t))
def test_text_without_syntax_comes_back_unchanged(prompt: str) -> None:
    assert parse_prompt(prompt) == [WeightedRun(prompt, 1.0)]


# Model-based: well-nested prompts built from a tree, with each word's weight computed independently.

WORDS = st.text(alphabet="abcxyz ", min_size=1, max_size=5)
EXPLICIT = st.integers(min_value=-300, max_value=300).map(lambda n: n / 100)


def nested(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.sampled_from(["round", "square", "explicit"]), st.lists(children, min_size=1, max_size=3), EXPLICIT)


TREES = st.recursive(WORDS, nested, max_leaves=12)


def render(tree) -> tuple[str, list[float]]:
    """The prompt for a tree and the weight of each of its characters, innermost factor first."""
    if isinstance(tree, str):
        return tree, [1.0] * len(tree)
    kind, children, explicit = tree
    rendered = [render(child) for child in children]
    inner = "".join(text for text, _ in rendered)
    weights = [weight for _, child_weights in rendered for weight in child_weights]
    if kind == "round":
        return f"({inner})", [weight * UP for weight in weights]
    if kind == "square":
        return f"[{inner}]", [weight * DOWN for weight in weights]
    return f"({inner}:{explicit!r})", [weight * explicit for weight in weights]


@settings(max_examples=500, deadline=None)
@given(st.lists(TREES, min_size=1, max_size=4))
def test_nested_brackets_multiply_exactly(trees: list) -> None:
    rendered = [render(tree) for tree in trees]
    prompt = "".join(text for text, _ in rendered)
    expected_weights = [weight for _, weights in rendered for weight in weights]

    parsed = parse_prompt(prompt)

    assert "".join(run.text for run in parsed) == "".join(c for c in prompt if c not in "()[]:.-0123456789")
    assert [run.weight for run in parsed for _ in run.text] == expected_weights
