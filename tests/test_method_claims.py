"""benchmarks/method_claims.py: verdicts from paired intervals, and a tiny end-to-end run that resumes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "method_claims.py"


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("method_claims", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(
    ("kind", "margin", "low", "high", "expected"),
    [
        ("better", 0.05, 0.01, 0.10, "confirmed"),
        ("better", 0.05, -0.10, 0.04, "refuted"),  # a 5-point gain is ruled out
        ("better", 0.05, -0.12, -0.02, "refuted"),
        ("better", 0.05, -0.02, 0.08, "inconclusive"),
        ("no worse", 0.02, -0.01, 0.05, "confirmed"),
        ("no worse", 0.02, -0.10, -0.03, "refuted"),
        ("no worse", 0.02, -0.05, 0.01, "inconclusive"),
    ],
)
def test_verdict(claims, kind, margin, low, high, expected):
    claim = claims.Claim("paper", "text", "a", "b", "short", "colour_shape_binding", kind, margin)
    assert claims.verdict(claim, low, high) == expected


def test_every_claim_names_evaluations_of_its_group(claims):
    for name, group in claims.GROUPS.items():
        evaluations = {evaluation.name for evaluation in group.evaluations}
        for claim in group.claims:
            if name == "personalization":
                assert {claim.a, claim.b} <= {"words", "ti", "core", "core+test-time"}
            else:
                assert {claim.a, claim.b} <= evaluations, claim


def test_tiny_run_writes_claims_and_resumes_without_rerunning(claims, tmp_path, monkeypatch, capsys):
    group = claims.Group(
        trainings=(claims.Training("projection", ("adapter", "--kind", "projection", "--steps", "2", "--batch-size", "2",
                                                  "--dataset-size", "8", "--checkpointing-steps", "2")),),
        evaluations=(
            claims.Evaluation("clip", "short", ("--limit", "2", "--steps", "2")),
            claims.Evaluation("projected", "short", ("--limit", "2", "--steps", "2", *claims.conditioner("projection"))),
        ),
        claims=(claims.Claim("WiCLP", "projection binds better", "projected", "clip", "short", "colour_shape_binding"),),
    )
    monkeypatch.setattr(claims, "GROUPS", {"tiny": group})
    argv = ["method_claims.py", "--out", str(tmp_path), "--groups", "tiny", "-n", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    claims.main()
    first = capsys.readouterr().out
    assert first.count("$ python -m condkit") == 3

    rows = json.loads((tmp_path / "claims.json").read_text())
    assert len(rows) == 1 and rows[0]["verdict"] in {"confirmed", "refuted", "inconclusive"}
    assert rows[0]["low"] <= rows[0]["difference"] <= rows[0]["high"]
    assert rows[0]["paired_images"] == 4  # 2 prompts × 2 shared seeds, one object each
    markdown = (tmp_path / "claims.md").read_text()
    assert "projected vs clip" in markdown and markdown.count("python -m condkit") == 3

    monkeypatch.setattr(sys, "argv", argv)
    claims.main()
    assert "$ python" not in capsys.readouterr().out  # everything was done: nothing runs again
    assert json.loads((tmp_path / "claims.json").read_text()) == rows
