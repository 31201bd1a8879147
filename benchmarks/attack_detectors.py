"""Clean vs attacked AUROC per detector and budget: how cheaply each OOD gate is fooled.

One white-box PGD run per detector (``oodprobe.attack_run.run_attack``, the defaults: L∞,
40 steps of ε/16, random start) on the offline default benchmark, every budget in one run; the
saved PNGs are scored. Prints AUROC (ID test vs clean OOD, vs attacked OOD), the success rate
at the threshold accepting 95 % of ID test images, the class-score SVM's held-out AUROC, and
seconds per image per step.

    .venv/bin/python benchmarks/attack_detectors.py                       # 32 images, 4 budgets
    .venv/bin/python benchmarks/attack_detectors.py --detectors knn,react --eps 4,8 --n 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from oodprobe.attack_run import run_attack
from oodprobe.presets import offline_default

DETECTORS = (
    "knn",
    "deep-knn",
    "gaussian",
    "mahalanobis",
    "relative-mahalanobis",
    "linear-probe",
    "logits:score=msp",
    "logits:score=energy",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="comma list of specs")
    parser.add_argument("--eps", default="1,2,4,8", help="budgets in /255, comma list")
    parser.add_argument("--n", type=int, default=32, help="OOD images attacked")
    parser.add_argument("--steps", type=int, default=None, help="PGD steps (default: 40)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file of the table")
    args = parser.parse_args()

    spec = offline_default()
    budgets = [float(value) for value in args.eps.split(",")]
    rows = []
    header = (
        f"{'detector':<22} {'eps':>7} {'clean':>6} {'attacked':>8} {'success':>7} "
        f"{'SVM':>6} {'s/img/step':>10}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as folder:
        for number, detector in enumerate(args.detectors.split(",")):
            run = run_attack(
                spec,
                Path(folder) / str(number),
                detector=detector,
                eps=[value / 255 for value in budgets],
                steps=args.steps,
                n=args.n,
            )
            timing = {item["attack"]: item for item in run.summary["timing"]["attacks"]}
            for result in run.results:
                svm = result["class_score_svm"] or {}
                row = {
                    "detector": detector,
                    "eps_255": result["eps_255"],
                    "clean_auroc": result["clean_auroc"],
                    "attacked_auroc": result["attacked_auroc"],
                    "clean_fpr": result["clean_fpr"],
                    "attacked_fpr": result["attacked_fpr"],
                    "success_rate": result["success_rate"],
                    "svm_auroc": svm.get("auroc"),
                    "seconds_per_image_step": timing[result["attack"]]["seconds_per_image_step"],
                }
                rows.append(row)
                svm_text = "–" if row["svm_auroc"] is None else f"{100 * row['svm_auroc']:.1f}"
                success = row["success_rate"]
                print(
                    f"{detector:<22} {row['eps_255']:>3g}/255 {100 * row['clean_auroc']:>6.1f} "
                    f"{100 * row['attacked_auroc']:>8.1f} "
                    f"{'–' if success is None else f'{100 * success:.0f}':>7} {svm_text:>6} "
                    f"{row['seconds_per_image_step']:>10.4f}",
                    flush=True,
                )
    if args.output is not None:
        args.output.write_text(json.dumps({"n": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
