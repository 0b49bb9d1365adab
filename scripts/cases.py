"""Case lists that config overrides train on, as named functions rather than comprehensions inside JSON strings:
the clean-label upper bound (``configs/train_clean_labels.json``) and the meta cases a MONAI Label user names
(``configs/train_monailabel.json``). The configs call them as ``_target_`` components."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

__all__ = ["case_id", "cases_by_id", "clean_label_cases"]

logger = logging.getLogger(__name__)

# suffixes that compress a format's own (``.nii.gz``): the id drops both
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def clean_label_cases(datalist: str, base_dir: str, split: str = "training") -> list[dict]:
    """The cases of ``split`` with their ``clean_label`` as the ``label`` and without a ``corruption_mask`` (it
    marks where the noisy label differs, which this label does not): training on them is the clean-label upper
    bound of the noisy-label methods. Paths are resolved against ``base_dir`` as ``load_decathlon_datalist`` does.

    Raises ValueError naming the cases without a ``clean_label``.
    """
    cases = load_decathlon_datalist(datalist, True, split, base_dir=base_dir)
    missing = [case["image"] for case in cases if "clean_label" not in case]
    if missing:
        raise ValueError(f"{len(missing)} {split} case(s) of {datalist} have no 'clean_label', e.g. {missing[:3]}.")
    return [{**{k: v for k, v in c.items() if k != "corruption_mask"}, "label": c["clean_label"]} for c in cases]


def case_id(path: str) -> str:
    """The id of a case: the file name of its image without the extension, ``.nii.gz`` counting as one
    (``/data/case_003.nii.gz`` -> ``case_003``), as MONAI Label's datastore names an image."""
    name = Path(path).name
    if name.endswith(COMPRESSION_SUFFIXES):
        name = name.rsplit(".", 1)[0]
    return Path(name).stem


def cases_by_id(cases: Iterable[dict], ids: str | Sequence[str]) -> list[dict]:
    """The cases whose :py:func:`case_id` of the image is one of ``ids``, in the order of ``cases``.

    ``ids`` is a list or a comma-separated string (``"case_003, case_004"``, as the MONAI Label training option
    ``meta_cases`` arrives); blanks around ids are ignored. An id that matches no case is logged as a warning.
    """
    wanted = [i.strip() for i in (ids.split(",") if isinstance(ids, str) else ids) if i.strip()]
    selected = [case for case in cases if case_id(case["image"]) in wanted]
    unmatched = sorted(set(wanted) - {case_id(case["image"]) for case in selected})
    if unmatched:
        logger.warning(f"case ids {unmatched} match no labelled case (ids are image file names without extension)")
    return selected
