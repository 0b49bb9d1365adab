"""The main job on the embedded default data: generate it if absent; train with MCPM, with plain training
on the same noisy labels, with the strongest simple baseline of the benchmark (``plain_dicece``: plain training
with MONAI's ``DiceCELoss``, docs/results.md) and with plain training on the clean versions of the labels (the
upper bound); evaluate each on the clean test labels and print a Dice table, MCPM's single-seed differences and
each method's training time.

Each step runs the bundle's own configs through ``python -m monai.bundle run``, exactly as a user would.

    python -m scripts.experiments.demo [--work_dir runs/demo] [--epochs 16]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from scripts.data.synthetic import generate_dataset
from scripts.experiments.methods import BUNDLE_ROOT, METHODS, bundle_run, class_names, read_case_dice, run_folders
from scripts.utils import nanmean, write_text

# the column name of each method this demo runs, and its name in scripts.experiments.methods.METHODS;
# plain training on the clean versions of the same training cases is the upper bound MCPM aims for
DEMO_METHODS = {"MCPM": "mcpm", "plain": "plain", "DiceCE": "plain_dicece", "clean": "clean"}


def results_table(results: dict[str, dict[str, list[float]]], class_names: list[str]) -> str:
    """A Markdown table: one row per test case, one column per method and class, then the means."""
    methods = list(results)
    header = ["case"] + [f"{m} {c}" for m in methods for c in class_names] + [f"{m} mean" for m in methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cases = sorted(results[methods[0]])

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    for case in cases:
        per_class = [fmt(results[m][case][i]) for m in methods for i in range(len(class_names))]
        means = [fmt(nanmean(results[m][case])) for m in methods]
        lines.append("| " + " | ".join([case] + per_class + means) + " |")
    class_means = [fmt(nanmean([results[m][c][i] for c in cases])) for m in methods for i in range(len(class_names))]
    overall = [fmt(nanmean([nanmean(results[m][c]) for c in cases])) for m in methods]
    lines.append("| **mean** | " + " | ".join(class_means + overall) + " |")
    return "\n".join(lines)


def single_seed_differences(results: dict[str, dict[str, list[float]]], reference: str = "MCPM") -> str:
    """One line: the reference method's mean test Dice minus each other method's, labelled as one seed, since
    the benchmark's paired interval over seeds (docs/results.md) is what decides between methods."""

    def mean_dice(method: str) -> float:
        return nanmean([nanmean(dice) for dice in results[method].values()])

    deltas = ", ".join(f"{reference} - {m} {mean_dice(reference) - mean_dice(m):+.3f}" for m in results if m != reference)
    return f"Mean Dice differences on this one seed (not an interval; docs/results.md has 10 seeds): {deltas}"


def main(argv: list[str] | None = None) -> None:
    """Generate the default data if absent, train and evaluate each method, print and write the Dice table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, default=BUNDLE_ROOT / "data" / "default")
    parser.add_argument("--work_dir", type=Path, default=BUNDLE_ROOT / "runs" / "demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    parser.add_argument("--epochs", type=int, default=None, help="override train.json's number of epochs")
    parser.add_argument(
        "--overwrite_data",
        action="store_true",
        help="replace a dataset_dir that holds another dataset (e.g. the 16-case default data of bundle 0.2.0)",
    )
    args = parser.parse_args(argv)

    start = time.time()
    datalist = generate_dataset(args.dataset_dir, seed=args.seed, overwrite=args.overwrite_data)
    print(f"dataset: {datalist}", flush=True)
    results, seconds = {}, {}
    for method, name in DEMO_METHODS.items():
        configs = METHODS[name].configs
        out = (args.work_dir / method).resolve()
        overrides: dict[str, object] = run_folders(args.dataset_dir.resolve(), out)
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        print(f"\n=== training with {method} ({time.time() - start:.0f} s) ===", flush=True)
        # the demo owns its runs/demo/<method> folders: each invocation trains them again from scratch
        started = time.perf_counter()
        bundle_run(configs, overwrite=True, **overrides)
        seconds[method] = time.perf_counter() - started
        print(f"\n=== evaluating {method} on the clean test labels ===", flush=True)
        bundle_run([*configs, "evaluate.json"], **overrides)
        results[method] = read_case_dice(out / "val_mean_dice_raw.csv")

    table = results_table(results, class_names=class_names(datalist.parent))
    times = ", ".join(f"{method} {seconds[method]:.0f} s" for method in DEMO_METHODS)
    summary = (
        f"Dice on the clean test labels ({time.time() - start:.0f} s in all):\n\n{table}\n\n"
        f"{single_seed_differences(results)}\n\n"
        f"Training time (python -m monai.bundle run, interpreter start included): {times}; "
        f"MCPM / plain {seconds['MCPM'] / seconds['plain']:.1f}x\n"
    )
    write_text(summary, args.work_dir / "results.md")
    print("\n" + summary)


if __name__ == "__main__":
    main()
