"""Wall time of whole training runs, the time a user waits: ``python -m monai.bundle run`` for plain training and
each other method at the bundle's defaults, on the same data and epochs, and each one's ratio to plain training.

Each run includes what a user's run includes: the interpreter and MONAI's start, the config checks, caching the
data, validation every ``val_interval`` epochs and the checkpoints. The methods are those of
:py:data:`scripts.experiments.methods.METHODS`; run them one after another on an otherwise idle machine.

    python -m scripts.experiments.run_timing --methods plain union mcpm mcpm_interval4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scripts.data.synthetic import generate_dataset
from scripts.experiments.methods import BUNDLE_ROOT, METHODS, bundle_run, run_folders
from scripts.utils import DATALIST, write_text


def time_runs(
    methods: list[str], dataset_dir: Path, work_dir: Path, overrides: dict[str, str] | None = None
) -> dict[str, float]:
    """Train each method once into ``work_dir/<method>`` (replacing an earlier run there) and return its wall time
    in seconds; ``overrides`` are ``--key value`` pairs for every run (fewer epochs, say)."""
    seconds = {}
    for name in methods:
        method = METHODS[name]
        out = (work_dir / name).resolve()
        options = {**run_folders(dataset_dir.resolve(), out), **method.overrides, **(overrides or {})}
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        bundle_run(method.configs, log_path=out / "train.log", overwrite=True, **options)
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    return seconds


def timing_table(seconds: dict[str, float], reference: str = "plain") -> str:
    """A Markdown table of the wall times and their ratio to ``reference``."""
    lines = ["| method | wall time s | / plain |", "|---|---|---|"]
    for name, value in seconds.items():
        lines.append(f"| {name} | {value:.0f} | {value / seconds[reference]:.2f}× |")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"an override is KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> str:
    """Time the runs, print the table and write it to ``work_dir/run_timing.md``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, default=BUNDLE_ROOT / "data" / "default")
    parser.add_argument("--work_dir", type=Path, default=BUNDLE_ROOT / "runs" / "run_timing")
    parser.add_argument("--methods", nargs="+", default=["plain", "union", "mcpm"], choices=list(METHODS))
    parser.add_argument("--override", type=_override, action="append", default=[], help="KEY=VALUE for every run")
    args = parser.parse_args(argv)
    if not (args.dataset_dir / DATALIST).is_file():
        generate_dataset(args.dataset_dir, seed=0)
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    seconds = time_runs(methods, args.dataset_dir, args.work_dir, dict(args.override))
    table = timing_table(seconds)
    write_text(table + "\n", args.work_dir / "run_timing.md")
    print("\n" + table)
    return table


if __name__ == "__main__":
    main()
