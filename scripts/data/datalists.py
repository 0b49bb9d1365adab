"""
Turn a real dataset folder into this bundle's datalist: ``training`` (labels as they are, possibly noisy), ``meta``
(the clean cases the user trusts), ``validation`` and ``test``.

Two layouts are read: a Medical Segmentation Decathlon task folder (``dataset.json``, ``imagesTr/``,
``labelsTr/``, ``imagesTs/``; e.g. Task03_Liver) and a LiTS folder (``volume-N.nii[.gz]`` with
``segmentation-N.nii[.gz]``, in any subfolders such as ``Training Batch 1``). The datalist names its files relative
to the dataset folder, so that ``configs/train.json`` reads it with ``--dataset_dir`` set to that folder. Nothing in
the dataset folder is changed; only the datalist file is written, and an existing one only with ``--overwrite``.

Usage from the bundle root::

    python -m scripts.data.datalists msd --task_dir /data/Task03_Liver --num_meta 5 --num_validation 16 --num_test 20
    python -m scripts.data.datalists lits --lits_dir /data/LiTS --meta_cases 3 17 42 --num_validation 16 --num_test 20
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.cases import case_id
from scripts.checks import DatalistError, validate_datalist
from scripts.utils import SPLITS, check_number, write_json

__all__ = [
    "DEFAULT_DATALIST",
    "LITS_LABELS",
    "lits_cases",
    "lits_datalist",
    "main",
    "msd_cases",
    "msd_datalist",
    "split_cases",
    "write_datalist",
]

UNLABELLED = "unlabelled"
DEFAULT_DATALIST = "datalist_mcpm.json"
MSD_REPLACED_KEYS = (*SPLITS, UNLABELLED, "numTraining", "numTest", "conversion")
LITS_LABELS = {"0": "background", "1": "liver", "2": "tumour"}
LITS_PATTERN = re.compile(r"^(test-volume|volume|segmentation)-(\d+)\.nii(\.gz)?$")
LITS_ID = re.compile(r"^(?:volume-)?(\d+)$")
MAX_LISTED = 10

Cases = dict[str, dict[str, str]]


def _listed(items: Sequence[str]) -> str:
    """``items`` joined with commas, at most :py:data:`MAX_LISTED` of them."""
    more = len(items) - MAX_LISTED
    return ", ".join(list(items[:MAX_LISTED]) + ([f"... ({more} more)"] if more > 0 else []))


def _quoted(ids: Sequence[str]) -> str:
    """Case ids for a message, quoted so that ``3`` reads as an id: ``'liver_3', 'liver_7'``."""
    return _listed([repr(case) for case in ids])


def _natural_key(text: str) -> tuple:
    """Sort key that orders ``liver_2`` before ``liver_10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def split_cases(
    case_ids: Sequence[str],
    *,
    num_validation: int,
    num_test: int,
    meta_cases: Sequence[str] | None = None,
    num_meta: int | None = None,
    seed: int = 0,
    source: str = "the dataset",
) -> dict[str, list[str]]:
    """
    Split case ids into ``training``, ``meta``, ``validation`` and ``test``: disjoint, covering every case.

    The meta cases are either named (``meta_cases``) or drawn at random (``num_meta``); exactly one of the two
    must be given. The ids are first sorted (naturally: ``liver_2`` before ``liver_10``), so the result does not
    depend on the order in which the files were listed. A random permutation from ``numpy.random.default_rng(seed)``
    of the sorted ids then gives, in this order, the random meta cases, the validation and the test cases; the
    remaining cases are the training cases. The same ids, sizes and seed give the same split; with named meta
    cases, they are left out before the permutation. Each split is returned sorted.

    Args:
        case_ids: ids of all labelled cases, unique.
        num_validation: number of validation cases, >= 1 (``configs/train.json`` keeps the model that does best
            on them).
        num_test: number of held-out test cases, >= 0.
        meta_cases: ids of the clean meta cases, unique and among ``case_ids``.
        num_meta: number of meta cases to draw at random, >= 1.
        seed: non-negative integer seed of the random choices.
        source: the file or folder the ids come from, named in error messages.

    Returns:
        the ids of every split, keyed ``training, meta, validation, test``.

    Raises:
        ValueError: when both or neither of ``meta_cases`` and ``num_meta`` are given, the meta set is empty, an id
            is duplicated or unknown, a size is out of range, or more cases are requested than ``source`` holds
            (at least one must remain for training).
    """
    if isinstance(meta_cases, (str, int)):  # one id, not a sequence of characters
        meta_cases = [str(meta_cases)]
    seed = check_number("seed", seed, 0, integer=True)
    num_validation = check_number("num_validation", num_validation, 1, integer=True)
    num_test = check_number("num_test", num_test, 0, integer=True)
    if (meta_cases is None) == (num_meta is None):
        raise ValueError(
            "give either meta_cases (the ids of the clean meta cases) or num_meta (to draw them at random), not both or neither."
        )
    if (meta_cases is not None and len(meta_cases) == 0) or (num_meta is not None and num_meta == 0):
        raise ValueError(
            "the meta set is empty: MCPM needs at least one clean meta case to learn the voxel weights from."
        )
    duplicates = sorted((case for case, count in Counter(case_ids).items() if count > 1), key=_natural_key)
    if duplicates:
        raise ValueError(f"{source} lists the case ids {_quoted(duplicates)} more than once.")
    ids = sorted(case_ids, key=_natural_key)
    if meta_cases is not None:
        meta = [str(case) for case in meta_cases]
        repeated = sorted((case for case, count in Counter(meta).items() if count > 1), key=_natural_key)
        if repeated:
            raise ValueError(f"meta case ids {_quoted(repeated)} are given more than once.")
        known = set(ids)
        unknown = [case for case in meta if case not in known]
        if unknown:
            raise ValueError(
                f"meta case ids {_quoted(unknown)} are not among the {len(ids)} labelled cases of {source} "
                f"(its ids are {_quoted(ids)})."
            )
        num_meta = len(meta)
    else:
        num_meta = check_number("num_meta", num_meta, 1, integer=True)
        meta = []
    requested = num_meta + num_validation + num_test
    if requested >= len(ids):
        raise ValueError(
            f"{num_meta} meta + {num_validation} validation + {num_test} test cases are requested but {source} has "
            f"only {len(ids)} labelled cases; at least one must remain for training."
        )
    chosen = set(meta)
    candidates = [case for case in ids if case not in chosen]
    rest = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    if not meta:
        meta, rest = rest[:num_meta], rest[num_meta:]
    splits = {
        "training": rest[num_validation + num_test :],
        "meta": meta,
        "validation": rest[:num_validation],
        "test": rest[num_validation : num_validation + num_test],
    }
    return {split: sorted(cases, key=_natural_key) for split, cases in splits.items()}


def _relative_path(value: object, where: str) -> str:
    """A path of ``dataset.json`` normalised (``./imagesTr/a.nii.gz`` to ``imagesTr/a.nii.gz``); must be relative."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} is {json.dumps(value)}, expected a file path.")
    if Path(value).is_absolute():
        raise ValueError(f"{where} is the absolute path {value}, expected a path relative to the task folder.")
    return os.path.normpath(value).replace(os.sep, "/")


def _missing_files(dataset_dir: Path, files: Sequence[tuple[str, str]], source: Path, hint: str = "") -> None:
    """Raise a FileNotFoundError naming ``source`` and every ``(path, what)`` of ``files`` absent from ``dataset_dir``."""
    missing = [(path, what) for path, what in files if not (dataset_dir / path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source} lists files that are not in {dataset_dir} ({len(missing)} missing): "
            f"{_listed([f'{path} ({what})' for path, what in missing])}; e.g. {dataset_dir / missing[0][0]} does not exist.{hint}"
        )


def _folder(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or an error naming it if it is not an existing folder."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{what} {folder} does not exist.")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is not a folder.")
    return folder


def msd_cases(task_dir: str | Path, skip_unlabelled: bool = False) -> tuple[dict[str, Any], Cases, list[str]]:
    """
    Read a Medical Segmentation Decathlon task folder and check that every file its ``dataset.json`` lists exists.

    Args:
        task_dir: the task folder, e.g. ``Task03_Liver``, holding ``dataset.json``.
        skip_unlabelled: ignore the unlabelled ``test`` images of ``dataset.json`` (``imagesTs``).

    Returns:
        the content of ``dataset.json``; the labelled cases, ``{case id: {"image": path, "label": path}}`` with
        paths relative to ``task_dir``; and the paths of the unlabelled images (empty with ``skip_unlabelled``).
        The case id is the image file name without extension, e.g. ``liver_3``.

    Raises:
        FileNotFoundError: when ``task_dir``, its ``dataset.json`` or a file it lists does not exist.
        ValueError: when ``dataset.json`` is not valid JSON of the MSD layout or lists a case id twice.
    """
    task_dir = _folder(task_dir, "MSD task folder")
    source = task_dir / "dataset.json"
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} not found: an MSD task folder (e.g. Task03_Liver) holds dataset.json next to imagesTr/ and labelsTr/."
        )
    try:
        content = json.loads(source.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{source} is not valid JSON ({error}).") from error
    if not isinstance(content, dict):
        raise ValueError(f"{source} holds a {type(content).__name__}, expected a JSON object with a 'training' list.")
    training = content.get("training")
    if not isinstance(training, list) or not training:
        raise ValueError(
            f'{source} has no \'training\' list of {{"image", "label"}} cases (found {json.dumps(training)[:50]}).'
        )
    cases: Cases = {}
    first_index: dict[str, int] = {}
    for index, entry in enumerate(training):
        where = f"{source}: training[{index}]"
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{where} is {json.dumps(entry)[:80]}, expected an object with 'image' and 'label'.")
        files = {key: _relative_path(entry[key], f"{where} {key}") for key in ("image", "label")}
        case = case_id(files["image"])
        if case in cases:
            raise ValueError(
                f"{where} ({files['image']}) has the case id {case} of training[{first_index[case]}]; "
                "case ids must be unique."
            )
        cases[case], first_index[case] = files, index
    _missing_files(
        task_dir,
        [(path, f"training[{first_index[c]}] {key}") for c, files in cases.items() for key, path in files.items()],
        source,
    )
    unlabelled: list[str] = []
    if not skip_unlabelled:
        test = content.get("test", [])
        if not isinstance(test, list):
            raise ValueError(f"{source}: 'test' is {json.dumps(test)[:50]}, expected a list of image paths.")
        for index, entry in enumerate(test):
            image = entry.get("image") if isinstance(entry, dict) else entry
            unlabelled.append(_relative_path(image, f"{source}: test[{index}]"))
        hint = " Pass --skip_unlabelled (skip_unlabelled=True) to leave the unlabelled test images out."
        _missing_files(task_dir, [(path, f"test[{index}]") for index, path in enumerate(unlabelled)], source, hint)
    return content, cases, unlabelled


def _lits_id(value: object) -> str:
    """Canonical LiTS case id: ``3`` for ``3``, ``03`` or ``volume-3``; other text is returned unchanged."""
    match = LITS_ID.match(str(value).strip())
    return str(int(match.group(1))) if match else str(value)


def lits_cases(lits_dir: str | Path, skip_unlabelled: bool = False) -> tuple[Cases, list[str]]:
    """
    Find the LiTS cases in ``lits_dir`` and its subfolders: ``volume-N.nii`` with ``segmentation-N.nii`` (either may
    be ``.nii.gz``; the two may lie in different subfolders), and the unlabelled ``test-volume-N.nii``.

    Args:
        lits_dir: the LiTS folder, e.g. holding ``Training Batch 1`` and ``Training Batch 2``.
        skip_unlabelled: ignore the ``test-volume-N`` images.

    Returns:
        the labelled cases, ``{case id: {"image": path, "label": path}}`` with the id ``N`` (``"3"`` for
        ``volume-3.nii``) and paths relative to ``lits_dir``; and the paths of the unlabelled images.

    Raises:
        FileNotFoundError: when ``lits_dir`` does not exist or holds no volume, or a volume has no segmentation or a
            segmentation no volume.
        ValueError: when two files have the same kind and number, e.g. ``volume-3.nii`` and ``volume-3.nii.gz``.
    """
    lits_dir = _folder(lits_dir, "LiTS folder")
    found: dict[str, dict[str, Path]] = {"volume": {}, "segmentation": {}, "test-volume": {}}
    for path in sorted(lits_dir.rglob("*.nii*")):
        match = LITS_PATTERN.match(path.name)
        if not match or not path.is_file():
            continue
        kind, case_id = match.group(1), str(int(match.group(2)))
        if case_id in found[kind]:
            raise ValueError(f"{path} and {found[kind][case_id]} are both {kind} {case_id}; keep only one of them.")
        found[kind][case_id] = path
    volumes, segmentations = found["volume"], found["segmentation"]
    if not volumes:
        raise FileNotFoundError(f"no volume-N.nii or volume-N.nii.gz files in {lits_dir} or its subfolders.")
    problems = [
        f"{volumes[c]} has no segmentation-{c}.nii[.gz]" for c in sorted(volumes, key=int) if c not in segmentations
    ]
    problems += [
        f"{segmentations[c]} has no volume-{c}.nii[.gz]" for c in sorted(segmentations, key=int) if c not in volumes
    ]
    if problems:
        raise FileNotFoundError(f"incomplete LiTS cases in {lits_dir} ({len(problems)}): {_listed(problems)}.")

    def relative(path: Path) -> str:
        return path.relative_to(lits_dir).as_posix()

    cases = {c: {"image": relative(volumes[c]), "label": relative(segmentations[c])} for c in sorted(volumes, key=int)}
    unlabelled = (
        [] if skip_unlabelled else [relative(found["test-volume"][c]) for c in sorted(found["test-volume"], key=int)]
    )
    return cases, unlabelled


def _assemble(
    header: Mapping[str, Any],
    cases: Cases,
    unlabelled: Sequence[str],
    splits: Mapping[str, list[str]],
    conversion: Mapping[str, Any],
) -> dict[str, Any]:
    """The datalist: ``header`` fields, the counts, a record of the conversion, the four splits and the unlabelled images."""
    datalist: dict[str, Any] = {
        **header,
        "numTraining": len(splits["training"]),
        "numTest": len(splits["test"]),
        "conversion": dict(conversion),
    }
    for split in SPLITS:
        datalist[split] = [dict(cases[case]) for case in splits[split]]
    if unlabelled:
        datalist[UNLABELLED] = [{"image": image} for image in unlabelled]
    return datalist


def _conversion_record(fmt: str, splits: Mapping[str, list[str]], named: bool, seed: int) -> dict[str, Any]:
    """What produced the datalist, so that it can be reproduced: format, seed, sizes and meta case ids."""
    return {
        "tool": "scripts.data.datalists",
        "format": fmt,
        "meta_selection": "named" if named else "random",
        "seed": seed,
        "meta_cases": splits["meta"],
        **{f"num_{split}": len(cases) for split, cases in splits.items()},
    }


def msd_datalist(
    task_dir: str | Path,
    *,
    num_validation: int,
    num_test: int,
    meta_cases: Sequence[str] | None = None,
    num_meta: int | None = None,
    seed: int = 0,
    skip_unlabelled: bool = False,
) -> dict[str, Any]:
    """
    The bundle's datalist of a Medical Segmentation Decathlon task folder, e.g. Task03_Liver.

    The labelled cases of ``dataset.json`` are split by :py:func:`split_cases`; case ids are image file names
    without extension (``liver_3``). The top-level fields of ``dataset.json`` (``name``, ``labels``, ``modality``,
    ...) are kept, except ``numTraining`` and ``numTest``, which count the new ``training`` and ``test`` lists, and
    the original ``test`` list of unlabelled images, which moves to ``unlabelled`` (``test`` here holds labelled
    held-out cases, as ``configs/evaluate.json`` needs). ``conversion`` records the seed, sizes and meta cases.
    Paths are relative to ``task_dir``. Nothing is written.

    Args:
        task_dir: the task folder holding ``dataset.json``.
        num_validation: number of validation cases, >= 1.
        num_test: number of labelled test cases, >= 0.
        meta_cases: ids of the clean meta cases, e.g. ``["liver_3", "liver_17"]``.
        num_meta: number of meta cases to draw at random instead.
        seed: seed of the random choices.
        skip_unlabelled: leave the unlabelled images out.

    Raises:
        FileNotFoundError: see :py:func:`msd_cases`.
        ValueError: see :py:func:`msd_cases` and :py:func:`split_cases`.
    """
    content, cases, unlabelled = msd_cases(task_dir, skip_unlabelled)
    source = str(Path(task_dir) / "dataset.json")
    splits = split_cases(
        list(cases),
        num_validation=num_validation,
        num_test=num_test,
        meta_cases=meta_cases,
        num_meta=num_meta,
        seed=seed,
        source=source,
    )
    header = {key: value for key, value in content.items() if key not in MSD_REPLACED_KEYS}
    return _assemble(header, cases, unlabelled, splits, _conversion_record("msd", splits, meta_cases is not None, seed))


def lits_datalist(
    lits_dir: str | Path,
    *,
    num_validation: int,
    num_test: int,
    meta_cases: Sequence[str | int] | None = None,
    num_meta: int | None = None,
    seed: int = 0,
    skip_unlabelled: bool = False,
) -> dict[str, Any]:
    """
    The bundle's datalist of a LiTS folder (``volume-N`` / ``segmentation-N``, see :py:func:`lits_cases`).

    The cases are split by :py:func:`split_cases`; the case id of ``volume-3.nii`` is ``3`` (``volume-3`` and ``03``
    are accepted in ``meta_cases`` too). The header follows the MSD fields with the LiTS labels
    (0 background, 1 liver, 2 tumour); ``test-volume-N`` images are listed under ``unlabelled``. Paths are relative
    to ``lits_dir``. Nothing is written.

    Args:
        lits_dir: the LiTS folder.
        num_validation: number of validation cases, >= 1.
        num_test: number of labelled test cases, >= 0.
        meta_cases: ids of the clean meta cases, e.g. ``[3, 17]`` or ``["volume-3", "volume-17"]``.
        num_meta: number of meta cases to draw at random instead.
        seed: seed of the random choices.
        skip_unlabelled: leave the ``test-volume-N`` images out.

    Raises:
        FileNotFoundError: see :py:func:`lits_cases`.
        ValueError: see :py:func:`lits_cases` and :py:func:`split_cases`.
    """
    cases, unlabelled = lits_cases(lits_dir, skip_unlabelled)
    if isinstance(meta_cases, (str, int)):
        meta_cases = [meta_cases]
    meta = None if meta_cases is None else [_lits_id(case) for case in meta_cases]
    splits = split_cases(
        list(cases),
        num_validation=num_validation,
        num_test=num_test,
        meta_cases=meta,
        num_meta=num_meta,
        seed=seed,
        source=str(lits_dir),
    )
    header = {
        "name": "LiTS",
        "description": "Liver Tumor Segmentation Challenge (LiTS) CT volumes, converted by scripts.data.datalists.",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(LITS_LABELS),
    }
    return _assemble(
        header, cases, unlabelled, splits, _conversion_record("lits", splits, meta_cases is not None, seed)
    )


def write_datalist(
    datalist: Mapping[str, Any], out: str | Path, dataset_dir: str | Path, overwrite: bool = False
) -> Path:
    """
    Write ``datalist`` as JSON to ``out`` (through a temporary file in the same folder, so that a failure leaves no
    partial file) and return ``out``.

    Args:
        datalist: the datalist, e.g. from :py:func:`msd_datalist`.
        out: the file to write; its folder is created if needed.
        dataset_dir: the folder the datalist's paths are relative to; ``out`` may never be one of its listed
            files or its ``dataset.json``.
        overwrite: replace ``out`` if it exists.

    Raises:
        FileExistsError: when ``out`` exists and ``overwrite`` is False.
        IsADirectoryError: when ``out`` is a folder.
        ValueError: when ``out`` is ``dataset.json`` or a file the datalist lists.
    """
    out, dataset_dir = Path(out), Path(dataset_dir)
    listed = {dataset_dir / "dataset.json"}
    for entries in datalist.values():
        if isinstance(entries, list):
            listed |= {
                dataset_dir / value
                for entry in entries
                if isinstance(entry, dict)
                for value in entry.values()
                if isinstance(value, str)
            }
    if out.resolve() in {path.resolve() for path in listed}:
        raise ValueError(f"{out} is a file of the dataset; choose another --out for the datalist.")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; --out must be the path of the datalist file.")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another --out or pass --overwrite (overwrite=True) to replace it."
        )
    write_json(datalist, out)
    return out


def _parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per dataset layout, sharing the split and output options."""
    common = argparse.ArgumentParser(add_help=False)
    meta = common.add_mutually_exclusive_group(required=True)
    meta.add_argument(
        "--meta_cases",
        nargs="+",
        metavar="ID",
        help="ids of the clean meta cases, e.g. liver_3 (MSD) or 3 (LiTS volume-3)",
    )
    meta.add_argument("--num_meta", type=int, metavar="N", help="draw N meta cases at random (with --seed)")
    common.add_argument(
        "--num_validation", type=int, required=True, metavar="N", help="number of validation cases (>= 1)"
    )
    common.add_argument("--num_test", type=int, required=True, metavar="N", help="number of labelled test cases (>= 0)")
    common.add_argument("--seed", type=int, default=0, help="seed of the random split (default: 0)")
    common.add_argument(
        "--out", type=Path, help=f"datalist file to write (default: <dataset folder>/{DEFAULT_DATALIST})"
    )
    common.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    common.add_argument("--skip_unlabelled", action="store_true", help="leave the unlabelled test images out")
    common.add_argument(
        "--check", action="store_true", help="then check every file with scripts.checks (reads all labels)"
    )
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    layouts = parser.add_subparsers(dest="layout", required=True)
    msd = layouts.add_parser(
        "msd", parents=[common], help="a Medical Segmentation Decathlon task folder (dataset.json)"
    )
    msd.add_argument("--task_dir", type=Path, required=True, help="the task folder, e.g. /data/Task03_Liver")
    lits = layouts.add_parser("lits", parents=[common], help="a LiTS folder of volume-N / segmentation-N files")
    lits.add_argument("--lits_dir", type=Path, required=True, help="the LiTS folder, e.g. /data/LiTS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: write the datalist and print a summary; return 0, or print the error and return 1."""
    args = _parser().parse_args(argv)
    dataset_dir = args.task_dir if args.layout == "msd" else args.lits_dir
    convert = msd_datalist if args.layout == "msd" else lits_datalist
    out = args.out if args.out is not None else dataset_dir / DEFAULT_DATALIST
    try:
        datalist = convert(
            dataset_dir,
            num_validation=args.num_validation,
            num_test=args.num_test,
            meta_cases=args.meta_cases,
            num_meta=args.num_meta,
            seed=args.seed,
            skip_unlabelled=args.skip_unlabelled,
        )
        write_datalist(datalist, out, dataset_dir, args.overwrite)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out)
    print(" ".join(f"{split}={len(datalist[split])}" for split in (*SPLITS, UNLABELLED) if split in datalist))
    print("meta cases: " + " ".join(datalist["conversion"]["meta_cases"]))
    if args.check:
        labels = datalist.get("labels")
        try:
            validate_datalist(
                out, dataset_dir, **({"num_classes": len(labels)} if isinstance(labels, dict) and labels else {})
            )
        except DatalistError as error:
            print(f"error: the datalist was written but {error}", file=sys.stderr)
            return 1
        print("check: every listed file is readable and consistent")
    print(
        "train with: python -m monai.bundle run --config_file configs/train.json "
        f"--dataset_dir {dataset_dir} --datalist {out} --ckpt_dir runs/<name>/models --output_dir runs/<name>"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
