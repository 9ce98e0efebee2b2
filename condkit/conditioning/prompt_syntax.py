"""AUTOMATIC1111 prompt emphasis: "(word)", "[word]", "(word:1.3)", escapes and BREAK.

`parse_prompt` turns a prompt into `WeightedRun` pieces carrying the same texts and weights
that the AUTOMATIC1111 web UI computes for it (its v1.6+ parser, which allows whitespace around
an explicit weight), so a prompt written for that UI means the same thing here.

The syntax:

- "(text)" multiplies the weight of its contents by 1.1, "[text]" by 1 / 1.1; nesting multiplies.
- "(text:1.3)" multiplies by the number instead: signs, decimals and whitespace are allowed,
  as in "(text: -0.5 )" or "(text:.5)".
- "\\(", "\\)", "\\[", "\\]" and "\\\\" are the literal characters; any other backslash is dropped.
- A bracket left open is closed at the end of the prompt (its multiplier covers the rest); a
  closing bracket with nothing to close is literal text, as is a ":" outside "(text:number)".
- "BREAK" as a whole word (at a word boundary on both sides, uppercase only) becomes the `BREAK`
  run and swallows the whitespace around it. Inside brackets it is multiplied like any run and
  so, as in the web UI, no longer counts as a break.
- Adjacent runs of equal weight are merged, and an empty prompt gives [WeightedRun("", 1.0)].
  Empty runs are kept where the web UI keeps them (either side of a BREAK, for instance).

Where the web UI has no answer we choose one, and only there do the two differ:

- "(text:1.2.3)": the web UI raises ValueError. Here a weight that is not a number is plain
  text, and the ")" closes the bracket as an ordinary "(...)".
- A weight that overflows a float saturates at +-sys.float_info.max instead of becoming inf.

Refused prompts (`parse_prompt(prompt, strict=True)`, which is what encoding uses through
`chunking.chunk_prompt`). The web UI accepts these and then produces NaN or infinite embeddings (a
black image) or crashes in the tokenizer; here each raises `ValueError` with a one-line message
that names the offending value, its index in the prompt, a short excerpt around it, and what was
expected. Prompts are refused, never silently cleaned: a cleaned prompt would quietly mean
something other than what was written, and these inputs almost always come from a bug upstream
(bytes decoded with errors="surrogateescape", a weight typed with too many digits, a generator
that forgot to close its brackets).

- Characters: a surrogate code point (U+D800-U+DFFF, which no UTF-8 text can contain: "\ud800")
  or a control character (Unicode category Cc: U+0000-U+001F and U+007F-U+009F) other than tab,
  newline and carriage return, which are whitespace. Format characters such as the zero-width
  joiner of emoji sequences, private-use and unassigned code points are accepted.
- Weights: every explicit weight must be a finite number with absolute value at most
  `MAX_PROMPT_WEIGHT` (100), and so must every token's effective weight, the product of all the
  brackets around it. A1111 weights are meaningful roughly within 0-2; 100 leaves room for
  experiments while keeping the scaled hidden states far from float16/float32 overflow.
  Weights on no text (an empty run) are not checked: they weight nothing.
- Nesting: at most `MAX_NESTING_DEPTH` (64) brackets, round and square together, may be open at
  once; the opening bracket that would be the 65th is refused. This includes brackets left open
  (closed implicitly at the end), so "(red:1.3" repeated 1,000 times is refused. Ordinary prompts
  nest a handful of levels; 64 "(" alone already weigh 1.1**64 = 445 > 100.

Without strict=True, `parse_prompt` accepts every string and reproduces the web UI's weights
(saturating as above); the checks are the only difference, so whatever strict parsing accepts it
parses identically. The parser is a loop with explicit stacks, so deep nesting never reaches
Python's recursion limit; a refusal is raised as soon as the offending character is read.
"""

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

ROUND_BRACKET_MULTIPLIER: Final = 1.1
# The web UI multiplies by this constant rather than dividing by 1.1; the two differ in the last bit.
SQUARE_BRACKET_MULTIPLIER: Final = 1 / 1.1

_ESCAPABLE: Final = frozenset("()[]\\")
_SYNTAX_CHARACTERS: Final = frozenset("\\()[]:")
_BREAK_WORD: Final = re.compile(r"\s*(?<!\w)BREAK(?!\w)\s*")
_LARGEST_WEIGHT: Final = sys.float_info.max

MAX_PROMPT_WEIGHT: Final = 100.0
"""Largest absolute explicit or effective token weight that strict parsing accepts."""
MAX_NESTING_DEPTH: Final = 64
"""Most brackets, round and square together, that strict parsing allows open at once."""

# Surrogates (Cs) and control characters (Cc) except tab, newline and carriage return.
_REFUSED_CHARACTER: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_EXCERPT_RADIUS: Final = 20


@dataclass(frozen=True)
class WeightedRun:
    """A piece of prompt text and the multiplier for its token embeddings.

    A chunk break is the run equal to `BREAK`; test for it with `run.is_break` (or `run == BREAK`).
    """

    text: str
    weight: float = 1.0

    @property
    def is_break(self) -> bool:
        # The web UI's own test: only this exact pair starts a new chunk.
        return self.text == "BREAK" and self.weight == -1.0


BREAK: Final = WeightedRun("BREAK", -1.0)
"""Marks a chunk break: the prompt continues in a new 75-token chunk."""


def parse_prompt(prompt: str, *, strict: bool = False) -> list[WeightedRun]:
    """Split an AUTOMATIC1111-style prompt into weighted runs (see the module docstring).

    With strict=True, refuse (ValueError, one line) the characters, weights and nesting that the
    module docstring lists; otherwise accept any string, as the web UI does.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    if strict:
        check_prompt_characters(prompt)
    return _EmphasisParser(prompt, strict=strict).parse()


def check_prompt_characters(prompt: str) -> None:
    """Raise ValueError (one line) at the first surrogate or refused control character, if any."""
    if (found := _REFUSED_CHARACTER.search(prompt)) is None:
        return
    character, index = found.group(), found.start()
    kind = "a surrogate code point" if "\ud800" <= character <= "\udfff" else "a control character"
    raise ValueError(
        f"prompt has {kind} {character!r} (U+{ord(character):04X}) at index {index} in {_excerpt(prompt, index)}; "
        "expected text that is valid Unicode (no surrogates) without control characters other than tab, "
        "newline and carriage return"
    )


def _excerpt(prompt: str, index: int, end: int | None = None) -> str:
    """A short repr of the prompt around prompt[index:end]: one line, whatever the prompt holds."""
    end = index + 1 if end is None else end
    start = max(0, index - _EXCERPT_RADIUS)
    stop = min(len(prompt), max(end, index + 1) + _EXCERPT_RADIUS, index + 3 * _EXCERPT_RADIUS)
    return ("..." if start > 0 else "") + repr(prompt[start:stop]) + ("..." if stop < len(prompt) else "")


def _shorten(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain_text(runs: Iterable[WeightedRun], break_separator: str = " ") -> str:
    """The prompt text without emphasis syntax; each break becomes `break_separator`."""
    return "".join(break_separator if run.is_break else run.text for run in runs)


def has_weights(runs: Iterable[WeightedRun]) -> bool:
    """True if any run with text is weighted other than 1, or there is a break.

    Empty runs are ignored: a weight on no text changes nothing.
    """
    return any(run.is_break or (run.text and run.weight != 1.0) for run in runs)


class _EmphasisParser:
    """One left-to-right pass, then the brackets still open, then merging.

    Pieces are appended with weight 1; a bracket remembers the index of the first piece after it,
    and closing it multiplies every piece from there on. Multiplying in closing order, one factor
    at a time, reproduces the web UI's floating-point results bit for bit.
    """

    def __init__(self, prompt: str, strict: bool = False) -> None:
        self.prompt = prompt
        self.strict = strict
        self.position = 0
        self.texts: list[str] = []
        self.weights: list[float] = []
        self.starts: list[int] = []  # index in the prompt of each piece, for error messages
        self.open_round: list[int] = []
        self.open_square: list[int] = []

    def parse(self) -> list[WeightedRun]:
        while self.position < len(self.prompt):
            self._read_next()
        for start in self.open_round:
            self._multiply_from(start, ROUND_BRACKET_MULTIPLIER)
        for start in self.open_square:
            self._multiply_from(start, SQUARE_BRACKET_MULTIPLIER)
        if self.strict:
            self._check_effective_weights()
        return self._merged_runs()

    def _read_next(self) -> None:
        character = self.prompt[self.position]
        if character == "\\":
            self._read_escape()
        elif character == "(":
            self._check_depth()
            self.open_round.append(len(self.texts))
            self.position += 1
        elif character == "[":
            self._check_depth()
            self.open_square.append(len(self.texts))
            self.position += 1
        elif character == ")" and self.open_round:
            self._multiply_from(self.open_round.pop(), ROUND_BRACKET_MULTIPLIER)
            self.position += 1
        elif character == "]" and self.open_square:
            self._multiply_from(self.open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
            self.position += 1
        elif character == ":" and self.open_round and (explicit := self._explicit_weight()) is not None:
            multiplier, self.position = explicit
            self._multiply_from(self.open_round.pop(), multiplier)
        elif character in _SYNTAX_CHARACTERS:  # ")" or "]" closing nothing, ":" starting no weight
            self._add_text(character)
            self.position += 1
        else:
            self._read_text()

    def _read_escape(self) -> None:
        escaped = self.prompt[self.position + 1 : self.position + 2]
        if escaped in _ESCAPABLE:
            self._add_piece(escaped)
            self.position += 2
        else:
            # A lone backslash vanishes but, as in the web UI, still leaves an empty piece.
            self._add_piece("")
            self.position += 1

    def _explicit_weight(self) -> tuple[float, int] | None:
        """The number of a ":number)" starting here and the position after its ")", if there is one."""
        prompt = self.prompt
        start = self._skip_whitespace(self.position + 1)
        end = start + 1 if start < len(prompt) and prompt[start] in "+-" else start
        digits_start = end
        while end < len(prompt) and (prompt[end] == "." or prompt[end].isdecimal()):
            end += 1
        if end == digits_start:
            return None
        closing = self._skip_whitespace(end)
        if closing >= len(prompt) or prompt[closing] != ")":
            return None
        try:
            multiplier = float(prompt[start:end])
        except ValueError:  # "1.2.3" or "."
            return None
        if self.strict and not abs(multiplier) <= MAX_PROMPT_WEIGHT:  # also catches inf
            raise ValueError(
                f"prompt weight {_shorten(prompt[start:end])} (= {multiplier!r}) at index {start} in "
                f"{_excerpt(prompt, start, end)} is out of range; expected a finite number between "
                f"{-MAX_PROMPT_WEIGHT:g} and {MAX_PROMPT_WEIGHT:g}"
            )
        return multiplier, closing + 1

    def _skip_whitespace(self, position: int) -> int:
        while position < len(self.prompt) and self.prompt[position].isspace():
            position += 1
        return position

    def _read_text(self) -> None:
        end = self.position
        while end < len(self.prompt) and self.prompt[end] not in _SYNTAX_CHARACTERS:
            end += 1
        self._add_text(self.prompt[self.position : end])
        self.position = end

    def _add_text(self, text: str) -> None:
        """Add text read at self.position, split at each BREAK (the pieces of _BREAK_WORD.split)."""
        part_start = 0
        for marker in _BREAK_WORD.finditer(text):
            self._add_piece(text[part_start : marker.start()], start=self.position + part_start)
            self._add_piece(BREAK.text, BREAK.weight, start=self.position + marker.start())
            part_start = marker.end()
        self._add_piece(text[part_start:], start=self.position + part_start)

    def _add_piece(self, text: str, weight: float = 1.0, start: int | None = None) -> None:
        self.texts.append(text)
        self.weights.append(weight)
        self.starts.append(self.position if start is None else start)

    def _check_depth(self) -> None:
        depth = len(self.open_round) + len(self.open_square) + 1
        if self.strict and depth > MAX_NESTING_DEPTH:
            raise ValueError(
                f"prompt nests brackets {depth} deep at index {self.position} in {_excerpt(self.prompt, self.position)}; "
                f"expected at most {MAX_NESTING_DEPTH} open '(' and '[' at once (write a literal bracket as '\\(' or '\\[')"
            )

    def _check_effective_weights(self) -> None:
        for text, weight, start in zip(self.texts, self.weights, self.starts):
            if text and not abs(weight) <= MAX_PROMPT_WEIGHT:
                raise ValueError(
                    f"prompt token weight {weight!r} of {_shorten(text)!r} at index {start} in "
                    f"{_excerpt(self.prompt, start)} is out of range after multiplying the brackets around it; "
                    f"expected between {-MAX_PROMPT_WEIGHT:g} and {MAX_PROMPT_WEIGHT:g}"
                )

    def _multiply_from(self, start: int, multiplier: float) -> None:
        for index in range(start, len(self.weights)):
            product = self.weights[index] * multiplier
            self.weights[index] = max(-_LARGEST_WEIGHT, min(_LARGEST_WEIGHT, product))

    def _merged_runs(self) -> list[WeightedRun]:
        if not self.texts:
            return [WeightedRun("", 1.0)]
        merged_texts = [self.texts[0]]
        merged_weights = [self.weights[0]]
        for text, weight in zip(self.texts[1:], self.weights[1:]):
            if weight == merged_weights[-1]:
                merged_texts[-1] += text
            else:
                merged_texts.append(text)
                merged_weights.append(weight)
        return [WeightedRun(text, weight) for text, weight in zip(merged_texts, merged_weights)]
