"""DOLLAR's ablation tables (papers/001 Tables 3, 5 and 7) on the embedded default.

    python benchmarks/dollar_ablations.py --out runs/ablations [--steps 600] [--variants vsd,vsd_cd,...]

Each variant is one ``fewstep distill --recipe dollar`` run from the same teacher, seed and budget
(the demo's, :data:`fewstep.demo.DEMO_SETTINGS`), followed by ``fewstep eval`` of its student at
its own step count on the eval suite; the teacher is evaluated at 50 steps with its CFG and at 4
steps. A finished variant (``OUT/<name>/eval/metrics.json``) is not rerun. Prints a Markdown
table (Table 3: quality / semantic / total, sharpness, FVD, Vendi; Table 5: JPEG compressibility;
Table 7: m = 1 vs 5), and writes it to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fewstep.demo import DEMO_SETTINGS
from fewstep.eval.runner import evaluate_to_dir
from fewstep.recipes.launch import distill

#: name → the dollar switches it sets (papers/001: Tab. 3 rows VSD / VSD+CD / VSD+CD+LRM, Tab. 5
#: VSD+DDPO, Tab. 7 m = 1, the heterogeneous parameterisation of §3.2).
VARIANTS: dict[str, list[str]] = {
    "vsd": ["ablation=vsd"],
    "vsd_cd": ["ablation=vsd_cd"],
    "vsd_cd_lrm_jpeg": ["ablation=vsd_cd_lrm", "reward=jpeg"],
    "vsd_lrm_jpeg": ["ablation=vsd_lrm", "reward=jpeg"],
    "vsd_ddpo_jpeg": ["ablation=vsd_ddpo", "reward=jpeg"],
    "vsd_cd_m1": ["ablation=vsd_cd", "m=1"],
    "vsd_cd_x0": ["ablation=vsd_cd", "parameterization=x0"],
}
COLUMNS = ("steps", "nfe", "total", "quality", "semantic", "sharpness", "fvd", "vendi_pixel", "vendi_feature",
           "jpeg")


def row(name: str, metrics: dict, seconds: float | None) -> str:
    values = {**metrics, "sharpness": metrics["dimensions"].get("sharpness")}
    cells = [f"{values[c]:.4g}" if isinstance(values[c], float) else str(values[c]) for c in COLUMNS]
    return f"| {name} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds / 60:.1f}'} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--model", default="toy-teacher")
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the demo's)")
    parser.add_argument("--variants", default="vsd,vsd_cd,vsd_cd_lrm_jpeg")
    parser.add_argument("--num", type=int, default=4, help="videos per eval prompt")
    args = parser.parse_args()

    base = [f"model={args.model}", *DEMO_SETTINGS] + ([f"train.steps={args.steps}"] if args.steps else [])
    lines = ["| variant | " + " | ".join(COLUMNS) + " | train min |", "|" + "---|" * (len(COLUMNS) + 2)]
    for label, steps in (("teacher 50 (CFG)", 50), ("teacher 4 (CFG)", 4)):
        target = args.out / f"teacher_{steps}"
        metrics_path = target / "metrics.json"
        if not metrics_path.is_file():
            evaluate_to_dir(args.model, target, steps=steps, num=args.num)
        lines.append(row(label, json.loads(metrics_path.read_text()), None))
        print(lines[-1], flush=True)
    for name in args.variants.split(","):
        run_dir, eval_dir = args.out / name, args.out / name / "eval"
        seconds = None
        if not (eval_dir / "metrics.json").is_file():
            start = time.monotonic()
            distill("dollar", None, [*base, *VARIANTS[name]], run_dir, overwrite=True)
            seconds = time.monotonic() - start
            evaluate_to_dir(str(run_dir / "student"), eval_dir, num=args.num)
            (eval_dir / "train_seconds.json").write_text(json.dumps({"seconds": seconds}))
        elif (eval_dir / "train_seconds.json").is_file():
            seconds = json.loads((eval_dir / "train_seconds.json").read_text())["seconds"]
        lines.append(row(name, json.loads((eval_dir / "metrics.json").read_text()), seconds))
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
