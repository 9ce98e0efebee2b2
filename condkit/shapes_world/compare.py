"""Paired comparison of two `condkit eval` reports: A − B per category and metric, with its 95% interval.

Both reports must hold the same prompts in the same order, each scored at the same seeds (every
`condkit eval` with the same prompt set, --limit, -n and --seed has them), so the difference is
taken image by image and bootstrapped over prompts and seeds (see bootstrap.py).

    a, b = read_report("runs/clip/eval.json"), read_report("runs/wiclp/eval.json")
    print(comparison_text(compare_reports(a, b), "clip", "wiclp"))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from condkit.shapes_world.bootstrap import LEVEL, paired_difference
from condkit.shapes_world.evaluate import score_matrix
from condkit.shapes_world.scorer import METRICS


def read_report(path: str | Path) -> dict[str, Any]:
    """An eval.json written by `condkit eval`, checked to hold per-image scores."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval report {str(path)!r} does not exist (expected an eval.json written by condkit eval)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"eval report {str(path)!r} is not JSON ({error}); expected an eval.json written by condkit eval") from None
    prompts = report.get("prompts") if isinstance(report, dict) else None
    usable = isinstance(prompts, list) and prompts and all(
        isinstance(p, dict) and isinstance(p.get("prompt"), str) and isinstance(p.get("seeds"), list)
        and isinstance(p.get("scores_by_category"), dict)
        for p in prompts
    )  # fmt: skip
    if not usable:
        raise ValueError(
            f"eval report {str(path)!r} holds no per-image scores by category; expected an eval.json written by "
            "this version of condkit eval (re-run the eval)"
        )
    report["path"] = str(path)
    return report


def check_paired(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Raise a one-line ValueError unless both reports scored the same prompts at the same seeds."""
    where = f"{a['path']!r} and {b['path']!r}"
    if len(a["prompts"]) != len(b["prompts"]):
        raise ValueError(f"{where} scored different prompt sets ({len(a['prompts'])} and {len(b['prompts'])} prompts); "
                         "expected the same prompts at the same seeds")  # fmt: skip
    for index, (first, second) in enumerate(zip(a["prompts"], b["prompts"])):
        if first["prompt"] != second["prompt"]:
            raise ValueError(f"{where} scored different prompt sets (prompt {index}: {first['prompt'][:40]!r} vs "
                             f"{second['prompt'][:40]!r}); expected the same prompts at the same seeds")  # fmt: skip
        if first["seeds"] != second["seeds"]:
            raise ValueError(f"{where} used different seeds for prompt {index} ({first['seeds']} vs {second['seeds']}); "
                             "expected the same seeds (same --seed and -n)")  # fmt: skip


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{category: {metric: {"a", "b", "difference", "low", "high", "significant", "paired_images"}}}."""
    check_paired(a, b)
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for category, row in a["table"].items():
        if category not in b["table"]:
            continue
        result[category] = {}
        for metric in METRICS:
            if metric in row and metric in b["table"][category]:
                paired = paired_difference(score_matrix(a["prompts"], category, metric), score_matrix(b["prompts"], category, metric))
                result[category][metric] = {"a": row[metric], "b": b["table"][category][metric], **paired}
    return result


def comparison_text(result: dict[str, dict[str, dict[str, Any]]], label_a: str, label_b: str) -> str:
    lines = [f"A = {label_a}", f"B = {label_b}"]
    for category, metrics in result.items():
        lines += ["", f"{category}:", f"  {'metric':22s} {'A':>6s} {'B':>6s}  {'A - B [95% interval]':28s} significant"]
        for metric, row in metrics.items():
            difference = f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"
            verdict = "yes" if row["significant"] else "no"
            lines.append(f"  {metric:22s} {row['a']:6.3f} {row['b']:6.3f}  {difference:28s} {verdict}")
    lines.append("")
    lines.append(f"significant: the {LEVEL:.0%} interval of the paired difference (same prompts and seeds) excludes 0")
    return "\n".join(lines)
