"""`condkit eval` plumbing: prompt sets, late-object specs, report files, errors."""

import json

import pytest

from condkit.cli import main
from condkit.shapes_world.evaluate import first_token_index, late_objects_spec, load_captions
from condkit.shapes_world.captions import ObjectRequirement, Spec
from tiny_models import byte_tokenizer, tiny_sd_pipeline


def test_first_token_index_counts_bos():
    tokenizer = byte_tokenizer()
    text = "ab cd"  # byte tokenizer: a, b</w>, c, d</w>
    assert first_token_index(tokenizer, text, 0) == 1
    assert first_token_index(tokenizer, text, 3) == 3


def test_late_objects_are_those_past_the_window():
    tokenizer = byte_tokenizer()
    text = "x" * 100 + " a red circle"
    early = ObjectRequirement(shape="square", colour="blue", size=None, position=None, first_char=0)
    late = ObjectRequirement(shape="circle", colour="red", size=None, position=None, first_char=101)
    spec = Spec(objects=[early, late], relations=[(0, "above", 1)], background=None, count=2)
    late_spec = late_objects_spec(spec, tokenizer, text)
    assert late_spec.objects == [late] and late_spec.relations == [] and late_spec.count is None
    assert late_objects_spec(Spec(objects=[early], relations=[], background=None, count=None), tokenizer, text) is None


def test_unknown_prompt_set():
    with pytest.raises(ValueError, match="unknown prompt set 'nope'; expected one of short, compositional, long"):
        load_captions("nope")


def test_eval_writes_table_json_and_grid(tmp_path, capsys):
    model = tmp_path / "tiny"
    tiny_sd_pipeline().save_pretrained(model)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model), "--prompt-set", "long", "--limit", "2", "-n", "2", "--steps", "1",
                 "--height", "32", "--width", "32", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "object_recall" in printed and "long" in printed
    report = json.loads((out / "eval.json").read_text())
    assert len(report["prompts"]) == 2 and all(len(p["scores"]) == 2 for p in report["prompts"])
    assert report["prompt_set"] == "long" and 0.0 <= report["table"]["long"]["object_recall"] <= 1.0
    assert (out / "grid.png").is_file()
    # Every metric of every category has its interval; the per-category scores are kept for --compare.
    for category, metrics in report["table"].items():
        for metric, value in metrics.items():
            low, high = report["intervals"][category][metric]
            assert low - 1e-9 <= value <= high + 1e-9, (category, metric)
    assert {"long", "trained pairs"} <= set(report["table"]) and "crossed" in report["bootstrap"]["method"]
    assert all(p["seeds"] == [0, 1] and len(p["scores_by_category"]["long"]) == 2 for p in report["prompts"])
    assert "[" in printed and "bootstrap interval" in printed
    assert main(["eval", "--compare", str(out / "eval.json"), str(out / "eval.json")]) == 0
    assert "+0.000 [+0.000, +0.000]" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--prompt-set", "nope"], "unknown prompt set 'nope'"),
    (["-n", "0"], "argument -n/--images-per-prompt: invalid value '0': expected a positive integer"),
])
def test_eval_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "m").mkdir()
    code = main(["eval", "--model", str(tmp_path / "m"), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_eval_model_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    code = main(["eval", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert code == 2 and "not a diffusers pipeline folder" in capsys.readouterr().err
