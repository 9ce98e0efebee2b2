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


def parse_prompt(prompt: str) -> list[WeightedRun]:
    """Split an AUTOMATIC1111-style prompt into weighted runs (see the module docstring)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}: {prompt!r}")
    return _EmphasisParser(prompt).parse()


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

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.position = 0
        self.texts: list[str] = []
        self.weights: list[float] = []
        self.open_round: list[int] = []
        self.open_square: list[int] = []

    def parse(self) -> list[WeightedRun]:
        while self.position < len(self.prompt):
            self._read_next()
        for start in self.open_round:
            self._multiply_from(start, ROUND_BRACKET_MULTIPLIER)
        for start in self.open_square:
            self._multiply_from(start, SQUARE_BRACKET_MULTIPLIER)
        return self._merged_runs()

    def _read_next(self) -> None:
        character = self.prompt[self.position]
        if character == "\\":
            self._read_escape()
        elif character == "(":
            self.open_round.append(len(self.texts))
            self.position += 1
        elif character == "[":
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
        for index, part in enumerate(_BREAK_WORD.split(text)):
            if index > 0:
                self._add_piece(BREAK.text, BREAK.weight)
            self._add_piece(part)

    def _add_piece(self, text: str, weight: float = 1.0) -> None:
        self.texts.append(text)
        self.weights.append(weight)

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
