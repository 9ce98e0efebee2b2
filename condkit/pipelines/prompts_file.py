"""Read prompts from a text file (one per line) or JSONL ({"prompt", "negative_prompt", "seed"}, and the per-encoder
prompts "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")."""

from __future__ import annotations

import json
from pathlib import Path

from condkit.conditioning.base import PER_ENCODER_PROMPTS
from condkit.pipelines.generate import PromptRequest

JSON_FIELDS = {"prompt", "negative_prompt", "negative", "seed", "spec", *PER_ENCODER_PROMPTS}  # spec: shapes-world prompt sets


def read_prompts_file(path: str | Path) -> list[PromptRequest]:
    """Blank lines and lines starting with '#' are skipped in .txt files; .jsonl is strict JSON per line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {str(file)!r} does not exist")
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # a UTF-8 byte-order mark is fine
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts file {str(file)!r} is not UTF-8 text (byte {error.start} cannot be read)") from None
    if file.suffix.lower() in (".jsonl", ".json"):
        requests = [_parse_json_line(file, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        requests = [PromptRequest(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not requests:
        raise ValueError(f"prompts file {str(file)!r} contains no prompts")
    return requests


def _parse_json_line(file: Path, number: int, line: str) -> PromptRequest:
    where = f"{file.name} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f'{where}: expected an object with a string "prompt", got {line.strip()[:60]!r}')
    unknown = set(record) - JSON_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(JSON_FIELDS)}")
    negative = record.get("negative_prompt", record.get("negative"))
    seed = record.get("seed")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: negative_prompt must be a string, got {negative!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    per_encoder = {name: record[name] for name in PER_ENCODER_PROMPTS if record.get(name) is not None}
    for name, text in per_encoder.items():
        if not isinstance(text, str):
            raise ValueError(f"{where}: {name} must be a string, got {text!r}")
    return PromptRequest(record["prompt"], negative, seed, **per_encoder)
