"""PGD's step schedule on a detector's score: which steps × step size fools it most.

The default of `oodprobe attack --method pgd` (40 steps of ε/16, ``oodprobe.attack``'s
``PGD_STEPS`` and ``PGD_STEP_FRACTION``) comes from this sweep. Each cell is one full
``run_attack`` (the saved PNGs encoded and scored), so the numbers are the ones a user sees.

    .venv/bin/python benchmarks/attack_pgd_steps.py                       # knn, offline default
    .venv/bin/python benchmarks/attack_pgd_steps.py --detector mahalanobis --eps 2,4,8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from oodprobe.attack_run import run_attack
from oodprobe.presets import offline_default

SCHEDULES = ((10, 4), (10, 8), (10, 16), (20, 8), (20, 16), (40, 4), (40, 8), (40, 16), (40, 32))
"""(steps, d): ``steps`` steps of ε/d."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="knn")
    parser.add_argument("--eps", default="4,8", help="budgets in /255, comma list")
    parser.add_argument("--n", type=int, default=32, help="OOD images attacked")
    parser.add_argument("--output", type=Path, default=None, help="JSON file of the table")
    args = parser.parse_args()

    spec = offline_default()
    rows = []
    print(
        f"{'eps':>6} {'steps':>5} {'step':>6} {'clean AUROC':>11} {'attacked':>9} "
        f"{'success':>8} {'seconds':>8}"
    )
    with tempfile.TemporaryDirectory() as folder:
        for eps in (float(value) for value in args.eps.split(",")):
            for steps, divisor in SCHEDULES:
                started = time.perf_counter()
                run = run_attack(
                    spec,
                    Path(folder) / f"eps{eps}-{steps}-{divisor}",
                    detector=args.detector,
                    eps=[eps / 255],
                    steps=steps,
                    step_size=eps / 255 / divisor,
                    n=args.n,
                )
                result = run.results[0]
                row = {
                    "eps_255": eps,
                    "steps": steps,
                    "step": f"eps/{divisor}",
                    "clean_auroc": result["clean_auroc"],
                    "attacked_auroc": result["attacked_auroc"],
                    "success_rate": result["success_rate"],
                    "seconds": time.perf_counter() - started,
                }
                rows.append(row)
                print(
                    f"{eps:>4g}/255 {steps:>5} {row['step']:>6} {100 * row['clean_auroc']:>11.1f} "
                    f"{100 * row['attacked_auroc']:>9.1f} {100 * row['success_rate']:>8.1f} "
                    f"{row['seconds']:>8.1f}",
                    flush=True,
                )
    if args.output is not None:
        args.output.write_text(json.dumps({"detector": args.detector, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
