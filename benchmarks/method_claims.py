"""Each method's claim, re-measured on the shapes world: shared seeds, paired differences, a verdict.

    python benchmarks/method_claims.py --out runs/claims                       # every group
    python benchmarks/method_claims.py --out runs/claims --groups compositional

For each group it trains what the comparisons need (`condkit train ...`), scores every conditioner
with `condkit eval` on the same prompts at the same seeds (-n images per prompt), and writes
claims.md and claims.json: per claim, A − B with its 95% crossed-bootstrap interval and a verdict.
The personalization group runs benchmarks/personalization.py, whose variants share seeds too.
Every command it runs is printed and listed in claims.md. It resumes: a training run that saved its
conditioner and an eval that wrote its eval.json are not run again.

A claim says A beats B on a metric ("better") or A is no worse than B ("no worse"); its margin is
the smallest difference the claim is about (5 points unless the paper's own claim is smaller).
- better: confirmed when the whole interval is above 0; refuted when the whole interval is below
  the margin (the claimed gain is ruled out, as is any loss beyond it); otherwise inconclusive.
- no worse: confirmed when the whole interval is above −margin; refuted when it is below −margin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from condkit.shapes_world.bootstrap import paired_difference
from condkit.shapes_world.compare import check_paired, read_report
from condkit.shapes_world.evaluate import score_matrix

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Training:
    name: str
    arguments: tuple[str, ...]  # after `condkit train`


@dataclass(frozen=True)
class Evaluation:
    name: str
    prompt_set: str
    arguments: tuple[str, ...] = ()  # conditioner options for `condkit eval`


@dataclass(frozen=True)
class Claim:
    source: str
    text: str
    a: str  # evaluation names
    b: str
    category: str
    metric: str
    kind: str = "better"  # or "no worse"
    margin: float = DEFAULT_MARGIN


@dataclass(frozen=True)
class Group:
    trainings: tuple[Training, ...]
    evaluations: tuple[Evaluation, ...]
    claims: tuple[Claim, ...]


def conditioner(run: str) -> tuple[str, ...]:
    return ("--conditioner", f"{{out}}/{run}/conditioner")


GROUPS: dict[str, Group] = {
    "compositional": Group(
        trainings=(
            Training("wiclp", ("adapter", "--kind", "projection", "--projection", "wiclp", "--learning-rate", "1e-4", "--steps", "500")),
            Training("clp", ("adapter", "--kind", "projection", "--projection", "clp", "--learning-rate", "1e-4", "--steps", "1000")),
            Training("llm", ("adapter", "--kind", "llm", "--steps", "500")),
            Training("llm-clip", ("adapter", "--kind", "llm", "--concat-clip", "--steps", "500")),
        ),
        evaluations=(
            Evaluation("compositional-clip", "compositional"),
            Evaluation("compositional-wiclp", "compositional", conditioner("wiclp")),
            Evaluation("compositional-clp", "compositional", conditioner("clp")),
            Evaluation("compositional-llm", "compositional", conditioner("llm")),
            Evaluation("compositional-llm-clip", "compositional", conditioner("llm-clip")),
        ),
        claims=(
            Claim("WiCLP", "a window-in-context projection of CLIP's tokens improves binding",
                  "compositional-wiclp", "compositional-clip", "compositional", "colour_shape_binding"),
            Claim("WiCLP", "a token-wise linear projection (CLP) improves binding",
                  "compositional-clp", "compositional-clip", "compositional", "colour_shape_binding"),
            Claim("WiCLP", "the window (WiCLP) binds better than the token-wise projection (CLP)",
                  "compositional-wiclp", "compositional-clp", "compositional", "colour_shape_binding"),
            Claim("ELLA", "an LLM connector follows compositional prompts better than CLIP: binding",
                  "compositional-llm", "compositional-clip", "compositional", "colour_shape_binding"),
            Claim("ELLA", "an LLM connector follows compositional prompts better than CLIP: relations",
                  "compositional-llm", "compositional-clip", "compositional", "relations"),
            Claim("ELLA", "the connector with CLIP concatenated binds better than CLIP",
                  "compositional-llm-clip", "compositional-clip", "compositional", "colour_shape_binding"),
            Claim("ELLA", "the connector with CLIP concatenated is no worse than CLIP on backgrounds",
                  "compositional-llm-clip", "compositional-clip", "compositional", "background", "no worse"),
        ),
    ),
    "long": Group(
        trainings=(Training("long-clip", ("long-clip",)),),
        evaluations=(
            Evaluation("long-clip77", "long", ("--opt", "max_chunks=1")),
            Evaluation("long-chunked", "long"),
            Evaluation("long-stretched", "long", ("--conditioner", "long-clip")),
            Evaluation("long-finetuned", "long", conditioner("long-clip")),
            Evaluation("short-clip", "short"),
            Evaluation("short-finetuned", "short", conditioner("long-clip")),
        ),
        claims=(
            Claim("Long-CLIP", "stretched positions see objects past token 77 (late-object recall)",
                  "long-stretched", "long-clip77", "late objects", "object_recall"),
            Claim("Long-CLIP", "fine-tuning the stretched tower improves late objects (recall)",
                  "long-finetuned", "long-stretched", "late objects", "object_recall"),
            Claim("Long-CLIP", "fine-tuned Long-CLIP binds late objects better than CLIP-77",
                  "long-finetuned", "long-clip77", "late objects", "colour_shape_binding"),
            Claim("Long-CLIP", "fine-tuned Long-CLIP recalls late objects better than chunked CLIP (A1111)",
                  "long-finetuned", "long-chunked", "late objects", "object_recall"),
            Claim("A1111", "chunking CLIP in 75-token windows sees late objects (recall)",
                  "long-chunked", "long-clip77", "late objects", "object_recall"),
            Claim("Long-CLIP", "fine-tuned Long-CLIP keeps short-prompt binding (within 2 points)",
                  "short-finetuned", "short-clip", "short", "colour_shape_binding", "no worse", 0.02),
        ),
    ),
    "personalization": Group(
        trainings=(),
        evaluations=(),
        claims=(
            Claim("CoRe", "CoRe improves prompt alignment over TI (whole recomposed prompt holds)",
                  "core", "ti", "personalization", "alignment_all_correct"),
            Claim("CoRe", "CoRe improves prompt alignment over TI (concept found in recomposed prompts)",
                  "core", "ti", "personalization", "alignment_concept_found"),
            Claim("CoRe", "CoRe keeps identity (colour and shape)",
                  "core", "ti", "personalization", "identity_colour_shape", "no worse"),
            Claim("CoRe", "test-time optimization improves alignment further",
                  "core+test-time", "core", "personalization", "alignment_all_correct"),
        ),
    ),
}


def verdict(claim: Claim, low: float, high: float) -> str:
    if claim.kind == "better":
        if low > 0:
            return "confirmed"
        return "refuted" if high < claim.margin else "inconclusive"
    if low > -claim.margin:
        return "confirmed"
    return "refuted" if high < -claim.margin else "inconclusive"


class Runner:
    def __init__(self, out: Path, model: str | None, images_per_prompt: int, log: list[str]):
        self.out, self.model, self.images_per_prompt, self.log = out, model, images_per_prompt, log

    def run(self, command: list[str], done: bool) -> None:
        """Run a step's command unless it is done; either way list it (claims.md shows every command)."""
        shown = " ".join(command).replace(sys.executable, "python")
        self.log.append(shown)
        if not done:
            print(f"$ {shown}", flush=True)
            subprocess.run(command, check=True)

    def with_model(self, arguments: list[str]) -> list[str]:
        return arguments + (["--model", self.model] if self.model else [])

    def train(self, training: Training) -> None:
        folder = self.out / training.name
        done = (folder / "conditioner").is_dir()
        resume = ["--resume"] if not done and any((folder / "checkpoints").glob("*")) else []
        self.run(self.with_model([sys.executable, "-m", "condkit", "train", *training.arguments, "--out", str(folder),
                                  "--quiet", *resume]), done)

    def evaluate(self, evaluation: Evaluation) -> None:
        folder = self.out / f"eval-{evaluation.name}"
        done = (folder / "eval.json").is_file()
        arguments = [argument.replace("{out}", str(self.out)) for argument in evaluation.arguments]
        overwrite = ["--overwrite"] if folder.exists() and not done else []
        self.run(self.with_model([sys.executable, "-m", "condkit", "eval", "--prompt-set", evaluation.prompt_set,
                                  "-n", str(self.images_per_prompt), "--out", str(folder), "--quiet", *arguments, *overwrite]), done)

    def personalization(self, steps: int) -> Path:
        path = self.out / "personalization.json"
        self.run(self.with_model([sys.executable, str(BENCHMARKS / "personalization.py"), "--steps", str(steps),
                                  "--n", str(self.images_per_prompt), "--quiet", "--json", str(path)]), done=path.is_file())
        return path


def difference_from_evals(out: Path, claim: Claim) -> dict:
    a, b = (read_report(out / f"eval-{name}" / "eval.json") for name in (claim.a, claim.b))
    check_paired(a, b)
    return paired_difference(score_matrix(a["prompts"], claim.category, claim.metric),
                             score_matrix(b["prompts"], claim.category, claim.metric))


def difference_from_personalization(path: Path, claim: Claim) -> dict:
    import numpy as np

    scores = json.loads(path.read_text())["scores"]
    return paired_difference(np.array(scores[claim.a][claim.metric], float), np.array(scores[claim.b][claim.metric], float))


def claim_rows(out: Path, groups: list[str]) -> list[dict]:
    rows = []
    for group in groups:
        for claim in GROUPS[group].claims:
            if group == "personalization":
                difference = difference_from_personalization(out / "personalization.json", claim)
            else:
                difference = difference_from_evals(out, claim)
            rows.append({**asdict(claim), **difference, "verdict": verdict(claim, difference["low"], difference["high"])})
    return rows


def markdown(rows: list[dict], commands: list[str]) -> str:
    lines = ["| source | claim | A vs B | metric (category) | A − B [95% interval] | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        kind = "" if row["kind"] == "better" else f", no worse by {row['margin']:.2f}"
        lines.append(f"| {row['source']} | {row['text']}{kind} | {row['a']} vs {row['b']} | {row['metric']} ({row['category']}) "
                     f"| {row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}] | **{row['verdict']}** |")
    return "\n".join(lines + ["", "Commands run:", "", "```bash", *commands, "```", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="runs/claims", help="folder for every run, eval and claims.md (default: runs/claims)")
    parser.add_argument("--groups", default="compositional,long,personalization",
                        help=f"comma-separated subset of {','.join(GROUPS)} (default: all)")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-world model)")
    parser.add_argument("-n", "--images-per-prompt", type=int, default=8)
    parser.add_argument("--personalization-steps", type=int, default=500)
    args = parser.parse_args()
    groups = args.groups.split(",")
    unknown = [group for group in groups if group not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; expected a subset of {', '.join(GROUPS)}")
    if args.images_per_prompt < 1 or args.personalization_steps < 1:
        parser.error("-n and --personalization-steps must be positive integers")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    runner = Runner(out, args.model, args.images_per_prompt, commands)
    for group in groups:
        for training in GROUPS[group].trainings:
            runner.train(training)
        for evaluation in GROUPS[group].evaluations:
            runner.evaluate(evaluation)
        if group == "personalization":
            runner.personalization(args.personalization_steps)
    rows = claim_rows(out, groups)
    (out / "claims.json").write_text(json.dumps(rows, indent=2))
    (out / "claims.md").write_text(markdown(rows, commands))
    print(markdown(rows, commands))


if __name__ == "__main__":
    main()
