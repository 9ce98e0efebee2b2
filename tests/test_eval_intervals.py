"""Uncertainty in `condkit eval`: crossed (prompts × seeds) bootstrap intervals, the trained / held-out split, and
`condkit eval --compare` (paired differences, its bad input)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from condkit.cli import build_parser, main
from condkit.shapes_world.bootstrap import interval, paired_difference
from condkit.shapes_world.captions import ObjectRequirement, Spec
from condkit.shapes_world.evaluate import DEFAULT_IMAGES_PER_PROMPT, HELD, TRAINED, pair_spec, score_matrix, summarise


def simulated_scores(rng: np.random.Generator, prompts: int, seeds: int, shift: float = 0.0) -> np.ndarray:
    """0/1 scores whose success rate varies a lot between prompts, as the shapes world's do."""
    rates = np.clip(rng.beta(0.7, 0.5, size=(prompts, 1)) + shift, 0, 1)
    return (rng.random((prompts, seeds)) < rates).astype(float)


def flat_bootstrap_width(values: np.ndarray, resamples: int = 2000) -> float:
    """Width of the naive interval that treats every image as independent."""
    flat = values.reshape(-1)
    means = np.random.default_rng(0).choice(flat, size=(resamples, flat.size)).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return high - low


def test_interval_is_deterministic_contains_the_mean_and_ignores_missing_values():
    values = simulated_scores(np.random.default_rng(1), 40, 8)
    values[3, :] = np.nan  # a metric that does not apply to one prompt
    mean, low, high = interval(values)
    assert (mean, low, high) == interval(values)
    assert low < mean < high and mean == pytest.approx(np.nanmean(values))
    assert all(np.isnan(interval(np.full((4, 2), np.nan))))


def test_interval_is_wider_than_treating_images_as_independent_and_covers_the_truth():
    values = simulated_scores(np.random.default_rng(2), 40, 8)
    _, low, high = interval(values)
    assert high - low > 1.5 * flat_bootstrap_width(values)
    # Coverage: across simulated evals, the interval holds the population mean about 95% of the time.
    truth = 0.7 / (0.7 + 0.5)
    rng = np.random.default_rng(3)
    hits = []
    for _ in range(100):
        _, low, high = interval(simulated_scores(rng, 40, 4), resamples=500)
        hits.append(low <= truth <= high)
    assert 0.88 <= np.mean(hits) <= 1.0


def crossed_scores(rng: np.random.Generator, prompts: int, seeds: int) -> np.ndarray:
    """0/1 scores with a prompt effect and a seed effect shared by every prompt (same initial noise); mean 0.5."""
    logits = rng.normal(0, 1.5, size=(prompts, 1)) + rng.normal(0, 0.8, size=(1, seeds))
    return (rng.random((prompts, seeds)) < 1 / (1 + np.exp(-logits))).astype(float)


def test_intervals_account_for_seeds_shared_by_every_prompt():
    """Seeds are crossed with prompts: a bootstrap over prompts alone misses the seed luck and under-covers."""
    rng = np.random.default_rng(8)
    crossed_hits, prompts_only_hits = [], []
    for _ in range(100):
        values = crossed_scores(rng, 40, 4)
        _, low, high = interval(values, resamples=400)
        crossed_hits.append(low <= 0.5 <= high)
        means = values[rng.integers(40, size=(400, 40))].mean(axis=(1, 2))
        low, high = np.percentile(means, [2.5, 97.5])
        prompts_only_hits.append(low <= 0.5 <= high)
    assert np.mean(crossed_hits) >= 0.9 and np.mean(crossed_hits) > np.mean(prompts_only_hits) + 0.05


def test_paired_difference_cancels_what_both_runs_share():
    rng = np.random.default_rng(4)
    a = simulated_scores(rng, 40, 8)
    same = paired_difference(a, a)
    assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0 and not same["significant"]
    # B fails a tenth of A's successes: a small effect the pairing resolves though each run's interval is ±10 points.
    b = a * (rng.random(a.shape) >= 0.1)
    paired = paired_difference(a, b)
    assert paired["significant"] and 0 < paired["low"] < paired["difference"] < paired["high"]
    _, low_a, high_a = interval(a)
    assert high_a - low_a > 2 * (paired["high"] - paired["low"])
    with pytest.raises(ValueError, match="same prompts and seeds"):
        paired_difference(a, b[:, :4])


def test_held_out_and_trained_objects_are_scored_apart():
    def requirement(colour, shape):
        return ObjectRequirement(shape=shape, colour=colour, size=None, position=None, first_char=0)

    spec = Spec(objects=[requirement("red", "square"), requirement("red", "circle")], relations=[(0, "above", 1)], count=2)
    held, trained = pair_spec(spec, True), pair_spec(spec, False)
    assert [o.shape for o in held.objects] == ["square"] and held.relations == [] and held.count is None
    assert [o.shape for o in trained.objects] == ["circle"]
    assert pair_spec(Spec(objects=[requirement("blue", "square")]), True) is None


def report_records(values: np.ndarray, prompts: list[str], seeds: list[int], category: str = "short") -> list[dict]:
    return [
        {"prompt": prompt, "seeds": seeds, "scores": None,
         "scores_by_category": {category: [{"colour_shape_binding": float(v), "relations": None} for v in row]}}
        for prompt, row in zip(prompts, values)
    ]  # fmt: skip


def write_report(path, values, prompts=None, seeds=None):
    prompts = prompts or [f"prompt {i}" for i in range(len(values))]
    seeds = seeds or list(range(values.shape[1]))
    records = report_records(values, prompts, seeds)
    table, intervals = summarise(records, ["short"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompt_set": "short", "table": table, "intervals": intervals, "prompts": records}))
    return str(path)


def test_summary_has_an_interval_for_every_metric_and_matrices_follow_prompts_and_seeds():
    values = simulated_scores(np.random.default_rng(5), 10, 4)
    records = report_records(values, [str(i) for i in range(10)], [0, 1, 2, 3])
    table, intervals = summarise(records, ["short", TRAINED])
    assert list(table) == ["short"] and set(intervals["short"]) == set(table["short"]) == {"colour_shape_binding"}
    assert np.array_equal(score_matrix(records, "short", "colour_shape_binding"), values)
    assert np.isnan(score_matrix(records, "short", "relations")).all()
    assert np.isnan(score_matrix(records, HELD, "colour_shape_binding")).all()


def test_compare_prints_the_paired_difference_and_significance(tmp_path, capsys):
    rng = np.random.default_rng(6)
    a = simulated_scores(rng, 40, 8)
    b = a * (rng.random(a.shape) >= 0.3)
    path_a, path_b = write_report(tmp_path / "a" / "eval.json", a), write_report(tmp_path / "b" / "eval.json", b)
    assert main(["eval", "--compare", path_a, path_b]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.strip().startswith("colour_shape_binding"))
    expected = paired_difference(a, b)
    assert f"{expected['difference']:+.3f}" in line and line.rstrip().endswith("yes")
    assert main(["eval", "--compare", path_a, path_a]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "colour_shape_binding" in line)
    assert "+0.000 [+0.000, +0.000]" in line and line.rstrip().endswith("no")


def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    values = simulated_scores(np.random.default_rng(7), 6, 4)
    good = write_report(tmp_path / "a" / "eval.json", values)
    other_prompts = write_report(tmp_path / "b" / "eval.json", values, prompts=[f"other {i}" for i in range(6)])
    fewer = write_report(tmp_path / "c" / "eval.json", values[:5])
    other_seeds = write_report(tmp_path / "d" / "eval.json", values, seeds=[10, 11, 12, 13])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "old.json").write_text(json.dumps({"prompts": [{"prompt": "x", "seeds": [0], "scores": [{}]}]}))
    cases = [
        ([str(tmp_path / "missing.json"), good], "does not exist"),
        ([good, other_prompts], "different prompt sets"),
        ([good, fewer], "different prompt sets"),
        ([good, other_seeds], "different seeds"),
        ([good, str(tmp_path / "bad.json")], "is not JSON"),
        ([str(tmp_path / "old.json"), good], "no per-image scores"),
    ]
    for paths, message in cases:
        assert main(["eval", "--compare", *paths]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["eval", "--compare", good]) == 2
    assert "--compare" in capsys.readouterr().err


def test_default_images_per_prompt_is_the_measured_choice():
    args = build_parser().parse_args(["eval"])
    assert args.images_per_prompt == DEFAULT_IMAGES_PER_PROMPT == 8
