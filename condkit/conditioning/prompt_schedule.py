"""AUTOMATIC1111 prompt editing, alternation and AND: which text to encode at which denoising step.

Prompt editing changes the text during sampling; `when` is a fraction of the steps if it has a
"." and a step number if not (A1111's default scheduling since v1.6):

- "[to:when]" adds `to` after step `when`: "a [b:3]" is "a " for steps 1-3, "a b" from step 4.
- "[from::when]" removes `from` after step `when`.
- "[from:to:when]" swaps: "a [b : c : 1] d" is "a b  d" at step 1, "a  c  d" from step 2.
- "[a|b|...]" alternates every step, starting with the first: "[fe|]male" is female, male, female, ...
- They nest ("a[b:[c:d:2]:1]e" is abe, ace, then ade) and can sit inside emphasis brackets:
  "(a [b:c:2]:1.2)". Their text keeps its emphasis syntax and escapes, which the emphasis parser
  (`prompt_syntax`) reads afterwards, for the text of each step.

Which prompts schedule: exactly those A1111's schedule grammar accepts, with A1111's reading. A
bracket that forms no edit (an unbalanced "[", "[a:b:c]" whose `when` is not a number) stays
literal text while the rest of the prompt still schedules; a "|" outside alternation brackets, or a
backslash that escapes nothing (at the very end, or before a line break), makes A1111's grammar fail
on the whole prompt, which is then literal text at every step. Where that grammar is ambiguous (an
edit directly followed by two or more unmatched "]", ")" or ":", as in "[b:3]]]"), A1111's parser
library sometimes reads the edit as literal text; here it always schedules.

`when` resolves, for a run of N steps, to int(value * N) with a "." and int(value) without, capped
at N; step s (1-based) shows `from` while s <= when. A1111 accepts any number there; here a `when`
below 0, a fraction above 1 or a step number above N is refused (ValueError, one line): A1111 would
silently show only one side ("[a:b:30]" at 20 steps is "a" throughout), which is almost always a
prompt written for another step count.

One deliberate difference: A1111's sampler looks the schedule up with a step counter that starts
at 0, so at run time each switch happens one step later than its own table (and doctests) say. The
table is what both document and what ANCHORS / the issue specify; condkit follows the table.

`AND` (upper case, a whole word) splits a positive prompt into sub-prompts for composable
diffusion, each with an optional trailing weight: "a cat AND a dog :1.2". As in A1111 the split is
plain text (an AND inside brackets splits too), a trailing ":number" is read even without AND
("a castle :1.5" guides 1.5 times as strongly), and each sub-prompt then has its own schedule.
Weights obey the emphasis bound: at most `MAX_PROMPT_WEIGHT` (100) in absolute value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from condkit.conditioning.prompt_syntax import MAX_NESTING_DEPTH, MAX_PROMPT_WEIGHT

_AND = re.compile(r"\bAND\b")
_TRAILING_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_WHITESPACE = re.compile(r"\s*")
_STRAY = "[]():"  # characters A1111's grammar lets stand alone outside any bracket construct
_PLAIN_STOP = "\\[]():|"


# --- the parse tree: a prompt is a list of nodes -----------------------------------------------


@dataclass(frozen=True)
class _Edit:
    """[from:to:when]; `before` is None for "[to:when]"."""

    before: tuple | None
    after: tuple
    when: str  # the number as written: whether it has a "." decides its meaning


@dataclass(frozen=True)
class _Alternation:
    options: tuple[tuple, ...]


_Node = Union[str, _Edit, _Alternation, tuple]  # text, an edit, an alternation, or a bracketed group


class _Unparsable(Exception):
    """The whole prompt is outside A1111's schedule grammar, so it is literal text."""


class _NoConstruct(Exception):
    """The bracket at this position forms no construct; at the top level it is a literal character."""


class _ScheduleParser:
    """Recursive descent over A1111's grammar: constructs are "(p)", "(p:p)", "[p]", "[to:when]",
    "[from:to:when]" and "[p|p|...]"; text is any run of characters other than \\ [ ] ( ) : | and
    backslash escapes (kept as written). At the top level a bracket, parenthesis or colon that starts
    no construct is literal."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.depth = 0

    def parse(self) -> tuple:
        nodes, position = [], 0
        while position < len(self.prompt):
            character = self.prompt[position]
            if character in "([":
                try:
                    node, position = self._construct(position)
                    nodes.append(node)
                    continue
                except _NoConstruct:
                    pass
            if character in _STRAY:
                nodes.append(character)
                position += 1
                continue
            text, position = self._text(position)
            if not text:  # "|" or a backslash escaping nothing
                raise _Unparsable
            nodes.append(text)
        return tuple(nodes)

    def _text(self, position: int) -> tuple[str, int]:
        start, prompt = position, self.prompt
        while position < len(prompt):
            character = prompt[position]
            if character == "\\":
                if position + 1 >= len(prompt) or prompt[position + 1] == "\n":
                    break
                position += 2
            elif character in _PLAIN_STOP:
                break
            else:
                position += 1
        return prompt[start:position], position

    def _sequence(self, position: int) -> tuple[tuple, int]:
        """Nodes up to the next ":", "|", "]" or ")" that closes nothing here."""
        nodes = []
        while position < len(self.prompt):
            character = self.prompt[position]
            if character in "([":
                node, position = self._construct(position)
                nodes.append(node)
                continue
            text, position = self._text(position)
            if not text:
                break
            nodes.append(text)
        return tuple(nodes), position

    def _expect(self, position: int, character: str) -> int:
        if position < len(self.prompt) and self.prompt[position] == character:
            return position + 1
        raise _NoConstruct

    def _construct(self, position: int) -> tuple[_Node, int]:
        if self.depth == MAX_NESTING_DEPTH:  # deeper than prompt_syntax accepts: it refuses the prompt, in one line
            raise _Unparsable
        self.depth += 1
        try:
            return self._construct_inside(position)
        finally:
            self.depth -= 1

    def _construct_inside(self, position: int) -> tuple[_Node, int]:
        if self.prompt[position] == "(":
            first, position = self._sequence(position + 1)
            if position < len(self.prompt) and self.prompt[position] == ":":
                second, position = self._sequence(position + 1)
                return ("(", first, ":", second, ")"), self._expect(position, ")")
            return ("(", first, ")"), self._expect(position, ")")
        first, position = self._sequence(position + 1)
        following = self.prompt[position : position + 1]
        if following == "]":
            return ("[", first, "]"), position + 1
        if following == "|":
            options = [first]
            while self.prompt[position : position + 1] == "|":
                option, position = self._sequence(position + 1)
                options.append(option)
            return _Alternation(tuple(options)), self._expect(position, "]")
        if following != ":":
            raise _NoConstruct
        when = self._when(position + 1)
        if when is not None:
            number, position = when
            return _Edit(None, first, number), position
        second, position = self._sequence(position + 1)
        if self.prompt[position : position + 1] != ":":
            raise _NoConstruct
        when = self._when(position + 1)
        if when is None:
            raise _NoConstruct
        number, position = when
        return _Edit(first, second, number), position

    def _when(self, position: int) -> tuple[str, int] | None:
        """The number of a ":[whitespace]number[whitespace]]" ending here, and the position after "]"."""
        position = _WHITESPACE.match(self.prompt, position).end()
        number = _NUMBER.match(self.prompt, position)
        if number is None:
            return None
        end = _WHITESPACE.match(self.prompt, number.end()).end()
        if self.prompt[end : end + 1] != "]":
            return None
        return number.group(), end + 1


@lru_cache(maxsize=4096)
def _parse(prompt: str) -> tuple | None:
    """The prompt's schedule tree, or None when the prompt has no edit or alternation (then its text is
    the same at every step)."""
    try:
        tree = _ScheduleParser(prompt).parse()
    except _Unparsable:
        return None
    return tree if _has_schedule(tree) else None


def _has_schedule(nodes: tuple) -> bool:
    for node in nodes:
        if isinstance(node, (_Edit, _Alternation)):
            return True
        if isinstance(node, tuple) and _has_schedule(node):
            return True
    return False


# --- resolving a tree at a step ----------------------------------------------------------------


def resolve_when(number: str, steps: int) -> int:
    """The last step that shows `from`: int(value * steps) with a ".", int(value) without, at most `steps`."""
    value = float(number)
    if "." in number:
        value *= steps
    return min(steps, int(value))


def _text_at(nodes: tuple, step: int, steps: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            if step <= resolve_when(node.when, steps):
                parts.append("" if node.before is None else _text_at(node.before, step, steps))
            else:
                parts.append(_text_at(node.after, step, steps))
        elif isinstance(node, _Alternation):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            parts.append(_text_at(node, step, steps))
    return "".join(parts)


def _edits(nodes: tuple):
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _edits(node.before or ())
            yield from _edits(node.after)
        elif isinstance(node, _Alternation):
            for option in node.options:
                yield from _edits(option)
        elif isinstance(node, tuple):
            yield from _edits(node)


# --- public API --------------------------------------------------------------------------------


def has_schedule(prompt: str) -> bool:
    """Whether the prompt's text changes between steps (it has an edit or an alternation A1111 reads)."""
    return _parse(prompt) is not None


def check_schedule(prompt: str, steps: int | None = None) -> None:
    """Refuse (ValueError, one line) a `when` below 0 or a fraction above 1; with `steps`, also a step
    number above `steps`."""
    tree = _parse(prompt)
    if tree is None:
        return
    for edit in _edits(tree):
        value = float(edit.when)
        fraction = "." in edit.when
        if value < 0 or (fraction and value > 1) or (not fraction and steps is not None and value > steps):
            limit = "" if steps is None else f" or a step number between 0 and {steps}"
            run = "" if steps is None else f" of this {steps}-step run"
            raise ValueError(
                f"prompt edit step {edit.when!r} in {prompt[:80]!r} is out of range{run}; expected a fraction "
                f"between 0 and 1 with a '.' (0.5 = half way){limit}"
            )


def prompt_at_step(prompt: str, step: int, steps: int) -> str:
    """The text of `prompt` at denoising step `step` (1-based) of a `steps`-step run."""
    if not 1 <= step <= steps:
        raise ValueError(f"step must be between 1 and {steps}, got {step}")
    tree = _parse(prompt)
    return prompt if tree is None else _text_at(tree, step, steps)


def prompt_table(prompt: str, steps: int) -> list[str]:
    """The text of `prompt` at steps 1..steps: A1111's schedule, one entry per step."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return [prompt_at_step(prompt, step, steps) for step in range(1, steps + 1)]


@dataclass(frozen=True)
class SubPrompt:
    text: str
    weight: float = 1.0


def split_subprompts(prompt: str) -> list[SubPrompt]:
    """A positive prompt split at each "AND" into sub-prompts, each with its trailing ":weight" (default 1)
    read off and its trailing whitespace dropped, as A1111 does."""
    subprompts = []
    for part in _AND.split(prompt):
        weight = _TRAILING_WEIGHT.search(part)
        if weight is None:
            subprompts.append(SubPrompt(part.rstrip()))
            continue
        value = float(weight.group(1))
        if not abs(value) <= MAX_PROMPT_WEIGHT:
            raise ValueError(
                f"AND weight {weight.group(1)} in {prompt[:80]!r} is out of range; expected a number between "
                f"{-MAX_PROMPT_WEIGHT:g} and {MAX_PROMPT_WEIGHT:g}"
            )
        subprompts.append(SubPrompt(part[: weight.start()], value))
    return subprompts


def is_composable(prompt: str) -> bool:
    """Whether a positive prompt uses AND or a trailing ":weight" (composable diffusion)."""
    return _AND.search(prompt) is not None or _TRAILING_WEIGHT.search(prompt) is not None


def needs_steps(prompt: str, *, positive: bool = True) -> bool:
    """Whether encoding `prompt` depends on the denoising step or needs composable diffusion."""
    if positive and is_composable(prompt):
        return True
    return has_schedule(prompt)
