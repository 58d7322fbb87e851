"""Ablation tables of the recipes on the embedded default.

    python benchmarks/ablations.py --recipe dollar --out runs/ablations/dollar [--steps 600] [--variants vsd,vsd_cd]
    python benchmarks/ablations.py --recipe dollar --out runs/ablations/dollar --variants vsd,vsd_cd --seeds 0,1,2,3 --jobs 8
    python benchmarks/ablations.py --recipe accvideo --out runs/ablations/accvideo [--synth 512]
    python benchmarks/ablations.py --recipe rgtd --out runs/ablations/rgtd --seeds 0,1,2,3
    python benchmarks/ablations.py --recipe rgtd --out runs/ablations/rgtd --seeds 0,1,2,3 --report  # so far
    python benchmarks/ablations.py --recipe swiftvideo --out runs/ablations/swiftvideo400 --steps 400 --seeds 0,1,2,3 --jobs 2

Each variant (``benchmarks/ablations/<recipe>.yaml``: name → a YAML overlay of the recipe, its
presets and keys, passed as the run's ``--config``) is one ``fewstep distill`` run from the same
teacher, seed and budget (for DOLLAR the
demo's, :data:`fewstep.demo.DEMO_SETTINGS`), followed by ``fewstep eval`` of its student at its
own step count on the eval suite; the teacher is evaluated with its CFG at 50, 8, 4 and 2
steps. A finished variant (``OUT/<name>/eval/metrics.json``) is not rerun. Each finished run's metrics
are also recorded in ``--results`` (default ``benchmarks/results/<OUT's name>/<run>.json``, committed: the
runs' folders are not), and a run recorded there is not rerun either, so a table of many seeds is built
over several sessions or machines; ``--report`` reads both. Prints a Markdown
table and writes it to ``OUT/table.md``:

* ``dollar`` — papers/001 Table 3 (VSD, VSD+CD, + LRM: quality / semantic / total, sharpness, FVD,
  Vendi), Table 5 (JPEG compressibility: LRM vs DDPO), Table 7 (m = 1 vs 5), and the
  heterogeneous parameterisation of §3.2;
* ``accvideo`` — papers/002 Table 3 (synthetic trajectories vs forward-diffused real data at the
  same budget; with and without the adversarial term and timestep-aware heads) and Table 4 (key
  vs uniform timesteps). The trajectory store is made first by ``fewstep synth`` (``--synth N``
  trajectories, ``--keep all`` so that the uniform-times variant can pick its times);
* ``rgtd`` — papers/000 Table 2 (trajectory distribution matching alone, + GAN, + rewards, full);
* ``swiftvideo`` — papers/003 Table 2a/2b/2d (CCD + DA against DA alone, DCD + DA, CCD alone, and the t
  samplers; Fréchet distance, lower is better, and total), Table 2c (± trajectory alignment, both rounds) and
  Figures 6/8 (synthetic against real preferred samples; DPO without reflow, whose Win Diff grows): the
  alignment rows (``ta_of``) run ``fewstep pairs`` on a student of this table, then the ``swiftvideo_ta`` recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

from fewstep.config import load_yaml
from fewstep.demo import DEMO_SETTINGS
from fewstep.eval.runner import evaluate_to_dir
from fewstep.recipes.launch import distill

#: Each recipe's variants: ``benchmarks/ablations/<recipe>.yaml``, name → a YAML overlay of the recipe
#: (its presets, then any keys), and the variants run when --variants is not given.
VARIANT_DIR = Path(__file__).with_name("ablations")
#: Where finished runs' metrics are recorded (one JSON per run, under the output folder's name).
RESULTS_DIR = Path(__file__).with_name("results")
DEFAULTS = {"dollar": "vsd,vsd_cd,vsd_cd_lrm_jpeg", "accvideo": "synthetic,forward",
            "swiftvideo": ",".join([v + s for s in ("", "_2step")
                                    for v in ("ccd_da", "da_only", "dcd_da", "ccd_only", "t_uniform", "t_lognorm_08")]
                                   + ["ta", "ta_2step", "ta_real", "ta_no_reflow", "ta2_2step", "ta2"]),
            "rgtd": "traj_only,gan,reward,full"}


def variants(recipe: str) -> dict[str, dict]:
    """``name → overlay`` of a recipe's ablation file."""
    return load_yaml(VARIANT_DIR / f"{recipe}.yaml")


COLUMNS = ("steps", "nfe", "total", "quality", "semantic", "sharpness", "fvd", "vendi_pixel", "vendi_feature",
           "jpeg", "win_diff")


def _values(metrics: dict) -> dict:
    """A run's table columns (``win_diff`` only in trajectory-alignment runs: a blank cell elsewhere)."""
    return {**metrics, "sharpness": metrics["dimensions"].get("sharpness")}


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)


def row(name: str, metrics: dict, seconds: float | None) -> str:
    values = _values(metrics)
    cells = [_cell(values.get(c)) for c in COLUMNS]
    return f"| {name} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds / 60:.1f}'} |"


def mean_row(name: str, runs: list[dict]) -> str:
    """``mean ± sample sd`` of each float column over the runs of one variant (one per seed)."""
    cells = []
    for column in COLUMNS:
        values = [_values(m).get(column) for m in runs]
        if not all(isinstance(v, float) for v in values):
            cells.append(_cell(values[0]))
            continue
        mean, sd = mean_sd(values)
        cells.append(f"{mean:.4g} ± {sd:.2g}")
    return f"| {name}: mean ± sd over {len(runs)} seeds | " + " | ".join(cells) + " | |"


#: Each recipe's paper claims tested by its table: (better variant, worse variant, column), read as "the first
#: scores higher on the column". A claim is reported when both variants were run with more than one seed.
CLAIMS = {
    "rgtd": [(a + suffix, b + suffix, column)  # papers/000 Table 2, at 4 steps and at 2 steps
             for suffix in ("", "_2step")
             for a, b, column in (("gan", "traj_only", "total"), ("reward", "traj_only", "total"),
                                  ("reward", "traj_only", "semantic"), ("full", "traj_only", "semantic"),
                                  ("full", "gan", "semantic"), ("full", "reward", "semantic"))],
    "swiftvideo": [(a + suffix, b + suffix, column)  # papers/003 Table 2a, 2b, 2d, at 4 steps and at 2 steps
                   for suffix in ("", "_2step")
                   for a, b in (("ccd_da", "da_only"), ("ccd_da", "dcd_da"), ("ccd_da", "ccd_only"),
                                ("ccd_da", "t_uniform"), ("ccd_da", "t_lognorm_08"))
                   for column in ("fvd", "total")]
                  + [(a, b, column)  # Table 2c (± TA, both rounds), Figure 6 (synthetic vs real preferred)
                     for a, b in (("ta", "ccd_da"), ("ta_2step", "ccd_da_2step"), ("ta2_2step", "ta_2step"),
                                  ("ta", "ta_real"))
                     for column in ("fvd", "total")]
                  + [("ta", "ta_no_reflow", "win_diff")],  # Figure 8: reflow keeps Win Diff down
}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


#: Columns where lower is better: a claim "a beats b" on them reads a < b, and its differences are b − a.
LOWER_IS_BETTER = {"fvd", "win_diff"}


def claim_line(better: str, worse: str, column: str, a: dict[int, float], b: dict[int, float]) -> str:
    """``better`` beats ``worse`` on ``column`` (higher, or lower for :data:`LOWER_IS_BETTER`) from each variant's
    values by training seed: the improvement of the means, in units of the pooled sd ``√((sd_a² + sd_b²)/2)`` (the
    seeds' spread), with whether it holds (improvement > 0) and clearly (> 2 sd); and, over the seeds both ran, the
    paired improvement (same seed: same initial noise and data order, so the seed's own effect cancels) as
    mean ± sd and mean / sd, from 3 seeds on (the sd of two differences says nothing)."""
    sign = -1.0 if column in LOWER_IS_BETTER else 1.0
    (ma, sa), (mb, sb) = mean_sd(list(a.values())), mean_sd(list(b.values()))
    pooled = math.sqrt((sa * sa + sb * sb) / 2)
    gain = sign * (ma - mb)
    units = gain / pooled if pooled > 0 else math.copysign(math.inf, gain)
    verdict = "holds" if gain > 0 else "does not hold"
    strength = " (> 2 sd)" if units > 2 else " (within 2 sd)" if gain > 0 else ""
    relation = "<" if sign < 0 else ">"
    line = (f"- {better} {relation} {worse} on {column}: {ma:.4f} vs {mb:.4f}, improvement {gain:+.4f} = "
            f"{units:+.1f} sd — {verdict}{strength}")
    common = sorted(set(a) & set(b))
    if len(common) > 2:
        md, sd = mean_sd([sign * (a[s] - b[s]) for s in common])
        ratio = md / sd if sd > 0 else math.copysign(math.inf, md)
        line += f"; paired over {len(common)} seeds {md:+.4f} ± {sd:.4f} ({ratio:+.1f} sd)"
    return line


def recorded(results: Path, run: str, metrics_path: Path) -> tuple[dict, float | None] | None:
    """A finished run's (metrics, training seconds): from its ``metrics_path`` (recording it in ``results``
    when it is not yet), else from ``results``; None when neither has it."""
    record = results / f"{run}.json"
    if metrics_path.is_file():
        seconds_path = metrics_path.with_name("train_seconds.json")
        seconds = json.loads(seconds_path.read_text())["seconds"] if seconds_path.is_file() else None
        metrics = json.loads(metrics_path.read_text())
        if not record.is_file():
            results.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(".tmp")
            tmp.write_text(json.dumps({"metrics": metrics, "train_seconds": seconds}, indent=1))
            tmp.replace(record)
        return metrics, seconds
    if record.is_file():
        data = json.loads(record.read_text())
        return data["metrics"], data["train_seconds"]
    return None


def run_name(variant: str, seed: int) -> str:
    return variant if seed == 0 else f"{variant}_s{seed}"


def train_and_eval(recipe: str, overlay: dict, overrides: list[str], run_dir: Path, num: int,
                   threads: int | None) -> None:
    """One variant: ``fewstep distill --config overlay`` into ``run_dir``, then ``fewstep eval`` into
    ``run_dir/eval``. The overlay is kept beside the run (``run_dir.overlay.yaml``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    config = run_dir.with_name(run_dir.name + ".overlay.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(overlay, sort_keys=False))
    start = time.monotonic()
    distill(recipe, config, overrides, run_dir, overwrite=True)
    seconds = time.monotonic() - start
    eval_dir = run_dir / "eval"
    evaluate_to_dir(str(run_dir / "student"), eval_dir, num=num)
    (eval_dir / "train_seconds.json").write_text(json.dumps({"seconds": seconds}))


def eval_name(sampler: str | None) -> str:
    """A run's eval folder: ``eval`` (the student's own sampler) or ``eval_<sampler>`` (``--sampler``)."""
    return "eval" if sampler is None else f"eval_{sampler}"


def eval_only(student: Path, steps: int | None, run_dir: Path, num: int, threads: int | None,
              sampler: str | None = None, aligned: bool = False) -> None:
    """A variant ``{eval_of: VARIANT, steps: N}`` trains nothing: ``fewstep eval`` of VARIANT's student of the same
    seed at N steps into ``run_dir/eval`` (a student whose training does not depend on its step count, such as a
    consistency model). With ``sampler`` (``--sampler``) every variant is evaluated this way, its student sampled
    by ``sampler`` into ``run_dir/eval_<sampler>``; a trajectory-alignment run (``aligned``) keeps its Win Diff."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not student.is_dir():
        raise SystemExit(f"{run_dir.name}: evaluates {student}, which is not there (run its variant with the same "
                         f"seed first, on this machine)")
    eval_dir = run_dir / eval_name(sampler)
    evaluate_to_dir(str(student), eval_dir, steps=steps, num=num, sampler=sampler, overwrite=sampler is not None)
    if aligned:
        add_win_diff(eval_dir / "metrics.json", run_dir)


#: Steps averaged for a trajectory-alignment run's Win Diff (its last logged values).
WIN_DIFF_TAIL = 50


def win_diff(run_dir: Path) -> float:
    """Mean of the last :data:`WIN_DIFF_TAIL` logged ``win_diff`` values (``e^w_θ − e^w_ref``) of a TA run."""
    key = "metric/student/dpo/win_diff"
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    tail = [row[key] for row in rows if key in row][-WIN_DIFF_TAIL:]
    return sum(tail) / len(tail)


def add_win_diff(metrics_path: Path, run_dir: Path) -> None:
    """Record a trajectory-alignment run's :func:`win_diff` in its evaluation's ``metrics.json``."""
    metrics = json.loads(metrics_path.read_text())
    metrics_path.write_text(json.dumps({**metrics, "win_diff": win_diff(run_dir)}, indent=1))


def align_and_eval(student: Path, pairs: list, pairs_num: int, seed: int, overlay: dict, overrides: list[str],
                   run_dir: Path, num: int, threads: int | None) -> None:
    """A variant ``{ta_of: VARIANT, pairs: [PREFERRED, DISPREFERRED], …}`` (SwiftVideo's trajectory alignment):
    ``fewstep pairs`` of VARIANT's student of the same seed (``PREFERRED`` steps or ``real`` against
    ``DISPREFERRED`` steps, ``pairs_num`` prompts, noise seeded by the training seed) into ``run_dir.pairs``, then
    ``fewstep distill --recipe swiftvideo_ta`` on that student and store with the rest of the overlay, then
    ``fewstep eval`` of the aligned student at its own steps; its Win Diff goes into the recorded metrics."""
    import torch

    from fewstep.synth import synthesize_pairs

    if threads:
        torch.set_num_threads(threads)
    if not student.is_dir():
        raise SystemExit(f"{run_dir.name}: aligns {student}, which is not there (run its variant with the same seed "
                         f"first, on this machine)")
    store = run_dir.with_name(run_dir.name + ".pairs")
    synthesize_pairs(student, store, pairs_num, preferred=pairs[0], dispreferred=int(pairs[1]), seed=seed)
    train_and_eval("swiftvideo_ta", overlay, [*overrides, f"model={student}", f"data.path={store}"], run_dir, num,
                   None)
    add_win_diff(run_dir / "eval" / "metrics.json", run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(DEFAULTS), default="dollar")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--model", default="toy-teacher")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the demo's)")
    parser.add_argument("--variants", default=None, help="comma-separated (default: the headline ones)")
    parser.add_argument("--num", type=int, default=4, help="videos per eval prompt")
    parser.add_argument("--synth", type=int, default=512, help="accvideo: trajectories to synthesize")
    parser.add_argument("--pairs", type=int, default=256, help="swiftvideo: preference pairs per alignment run")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (train.seed) per variant")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once (separate processes)")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of the runs finished so far")
    parser.add_argument("--sampler", choices=["euler", "ddim", "consistency"], default=None,
                        help="train nothing: evaluate every variant's finished student with this sampler instead of "
                             "its own (results in <OUT's name>_<sampler>, the table in OUT/table_<sampler>.md; "
                             "teacher rows keep the teacher's own sampler)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where finished runs are recorded (default: benchmarks/results/<OUT's name>)")
    args = parser.parse_args()
    results_dir = args.results or RESULTS_DIR / (args.out.name + (f"_{args.sampler}" if args.sampler else ""))
    seeds = [int(s) for s in args.seeds.split(",")]

    known, default = variants(args.recipe), DEFAULTS[args.recipe]
    base = [f"model={args.model}", *DEMO_SETTINGS] + ([f"train.steps={args.steps}"] if args.steps else [])
    if args.recipe == "accvideo":
        from fewstep.synth import synthesize

        store = args.out / "synvid"
        synthesize(args.model, store, args.synth, keep="all")  # resumes / is a no-op when complete
        base.append(f"data={store}")
    lines = ["| variant | " + " | ".join(COLUMNS) + " | train min |", "|" + "---|" * (len(COLUMNS) + 2)]
    for label, steps in (("teacher 50 (CFG)", 50), ("teacher 8 (CFG)", 8), ("teacher 4 (CFG)", 4),
                         ("teacher 2 (CFG)", 2)):
        target = args.out / f"teacher_{steps}"
        finished = recorded(results_dir, target.name, target / "metrics.json")
        if finished is None:
            if args.report:
                continue
            evaluate_to_dir(args.model, target, steps=steps, num=args.num)
            finished = recorded(results_dir, target.name, target / "metrics.json")
        lines.append(row(label, finished[0], None))
        print(lines[-1], flush=True)
    names = (args.variants or default).split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(known)}")

    def done(name: str, seed: int) -> tuple[dict, float | None] | None:
        run = run_name(name, seed)
        return recorded(results_dir, run, args.out / run / eval_name(args.sampler) / "metrics.json")

    # seed-major: every variant's seed 0 first
    todo = [] if args.report else [(name, seed) for seed in seeds for name in names if not done(name, seed)]
    jobs = max(1, min(args.jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def job(name: str, seed: int) -> tuple[str | None, tuple]:
        """``(the run it needs first or None, (function, *arguments))`` of one run."""
        overlay, run_dir = known[name], args.out / run_name(name, seed)
        overrides = [*base, f"train.seed={seed}"]
        if args.sampler is not None:  # evaluation only, of students already trained
            source = run_name(overlay["eval_of"], seed) if "eval_of" in overlay else run_name(name, seed)
            return None, (eval_only, args.out / source / "student", overlay.get("steps") if "eval_of" in overlay
                          else None, run_dir, args.num, threads, args.sampler, "ta_of" in overlay)
        if "eval_of" in overlay:
            needs = run_name(overlay["eval_of"], seed)
            return needs, (eval_only, args.out / needs / "student", int(overlay["steps"]), run_dir, args.num,
                           threads)
        if "ta_of" in overlay:
            needs = run_name(overlay["ta_of"], seed)
            rest = {k: v for k, v in overlay.items() if k not in ("ta_of", "pairs")}
            return needs, (align_and_eval, args.out / needs / "student", overlay["pairs"], args.pairs, seed, rest,
                           overrides, run_dir, args.num, threads)
        return None, (train_and_eval, args.recipe, overlay, overrides, run_dir, args.num, threads)

    work = [job(name, seed) for name, seed in todo]
    if jobs == 1:  # in order: a variant's file lists a run after the one it needs
        for (_, (function, *arguments)), (name, seed) in zip(work, todo):
            function(*arguments)
            done(name, seed)  # recorded at once
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            # independent runs first; a run that needs another one's student is submitted once that one is done
            futures = {run_name(name, seed): pool.submit(*item)
                       for (needs, item), (name, seed) in zip(work, todo) if needs is None}
            for (needs, item), (name, seed) in zip(work, todo):
                if needs is not None:
                    if (first := futures.get(needs)) is not None:
                        first.result()
                    futures[run_name(name, seed)] = pool.submit(*item)
            for future in futures.values():
                future.result()
    results: dict[str, dict[int, dict]] = {}  # variant → seed → values
    for name in names:
        runs = {}
        for seed in seeds:
            if (finished := done(name, seed)) is None:
                continue
            runs[seed] = finished[0]
            lines.append(row(run_name(name, seed), finished[0], finished[1]))
            print(lines[-1], flush=True)
        if len(runs) > 1:
            lines.append(mean_row(name, list(runs.values())))
            print(lines[-1], flush=True)
            results[name] = {seed: _values(m) for seed, m in runs.items()}
    claims = [claim_line(a, b, column, {s: m[column] for s, m in results[a].items()},
                         {s: m[column] for s, m in results[b].items()})
              for a, b, column in CLAIMS.get(args.recipe, []) if a in results and b in results]
    if claims:
        lines += ["", "Claims (mean over the seeds run; sd = the pooled sample sd of the two variants; paired: the "
                      "per-seed differences):", *claims]
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)  # --report on another machine: no run folder yet
    (args.out / ("table.md" if args.sampler is None else f"table_{args.sampler}.md")).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
