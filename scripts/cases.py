"""Case lists that configs run on, as named functions rather than comprehensions inside JSON strings: the
clean-label upper bound (``configs/train_clean_labels.json``), the meta cases a MONAI Label user names
(``configs/train_monailabel.json``), the images of an inference folder (``configs/inference.json``) and the check
of the evaluation split (``configs/evaluate.json``). The configs call them as ``_target_`` components; the last two
refuse bad inputs, all problems at once, before any case is segmented or scored."""

from __future__ import annotations

import difflib
import errno
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from monai.data import FolderLayout, load_decathlon_datalist

from scripts.checks import (
    MAX_LISTED,
    BundleInputError,
    DatalistError,
    Volume,
    affine_problem,
    brief_error,
    channel_problem,
    output_dir_problem,
    read_volume,
    thin_axes,
    validate_datalist,
)
from scripts.utils import ProblemsError, as_flag, atomic_temporary_target

__all__ = [
    "EvaluationDataError",
    "InferenceInputError",
    "case_id",
    "cases_by_id",
    "check_eval_data",
    "clean_label_cases",
    "inference_cases",
    "labelled_cases",
    "prediction_path",
]

logger = logging.getLogger(__name__)

# suffixes that compress a format's own (``.nii.gz``): the id drops both
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
# the 3D image files inference segments: those MONAI's LoadImage reads with nibabel (NIfTI) or ITK (NRRD, MetaImage);
# other files of the input folder (notes, the ``.raw`` data of an ``.mhd`` header, hidden files) are ignored
INFERENCE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# the least free space inference starts with, whatever its estimate of the predictions' size (MB)
MIN_FREE_MB = 1.0


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


def labelled_cases(datalist: str, base_dir: str, splits: Sequence[str] = ("training", "meta")) -> list[dict]:
    """The cases of every split in ``splits``, in that order, each with only its ``image`` and ``label``: the data of
    the baselines that train on every label a user has (``configs/train_union.json``, ``train_balanced.json``).

    The other keys (a training case's ``corruption_mask``, ``clean_label``) are left out, so that cases of different
    splits collate into one batch and nothing but the labels a user would train on reaches the network.
    """
    return [
        {"image": case["image"], "label": case["label"]}
        for split in splits
        for case in load_decathlon_datalist(datalist, True, split, base_dir=base_dir)
    ]


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


class InferenceInputError(ProblemsError):
    """The input or output folder of inference cannot be used; ``problems`` lists every problem found."""

    heading = "inference input check failed"


class EvaluationDataError(ProblemsError):
    """The evaluation split of a datalist, or a file it names, cannot be scored; ``problems`` lists every problem."""

    heading = "evaluation data check failed"


def _listing(names: Sequence[str]) -> str:
    """The first :py:data:`scripts.checks.MAX_LISTED` of ``names``, comma-separated, with the count if cut."""
    return ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def _missing_folder_problem(input_dir: Path) -> str | None:
    """Why ``input_dir`` is not a folder that can be listed (with the closest sibling folder name for a typo)."""
    if input_dir.is_dir():
        try:
            next(iter(os.scandir(input_dir)), None)
        except OSError as error:
            return f"input folder {input_dir} cannot be listed ({brief_error(error)})"
        return None
    if input_dir.exists():
        return f"input folder {input_dir} is a file, not a folder of images"
    hint = ""
    try:
        siblings = [p.name for p in input_dir.parent.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(input_dir.name, siblings, n=1)
        hint = f"; did you mean {input_dir.parent / close[0]}?" if close else ""
    except OSError:
        pass
    return f"input folder {input_dir} does not exist{hint}"


def _has_image_name(path: Path) -> bool:
    """Whether ``path`` is named as an image inference segments: visible, with one of :py:data:`INFERENCE_SUFFIXES`."""
    return not path.name.startswith(".") and path.name.lower().endswith(INFERENCE_SUFFIXES)


def _is_image(path: Path) -> bool:
    """Whether ``path`` is a file inference segments: a visible file with one of :py:data:`INFERENCE_SUFFIXES`."""
    return _has_image_name(path) and path.is_file()


def _link_chain(link: Path) -> str:
    """Where the symbolic link ``link`` leads, link by link, up to a repeat: ``a.nii.gz -> b.nii.gz -> a.nii.gz``."""
    chain, seen, current = [link.name], set(), link
    while current.is_symlink() and current not in seen and len(chain) <= MAX_LISTED:
        seen.add(current)
        target = os.readlink(current)
        current = Path(os.path.normpath(current.parent / target))
        chain.append(target)
    return " -> ".join(chain)


def _link_problem(path: Path) -> str | None:
    """Why ``path``, if a symbolic link with an image's name, leads to no image file: it is dangling, in a loop, or
    leads to a folder. Such a link is not a file, so without this check its image would be left out in silence."""
    if not (_has_image_name(path) and path.is_symlink()) or path.is_file():
        return None
    try:
        os.stat(path)
    except OSError as error:
        what = "in a loop" if error.errno == errno.ELOOP else "to a file that does not exist"
        return f"{path} is a symbolic link {what} ({_link_chain(path)}); replace it with the image or remove it"
    return f"{path} is a symbolic link to a folder ({_link_chain(path)}), not an image file"


def _no_image_problem(input_dir: Path, entries: Sequence[Path]) -> str:
    """The problem of an input folder without images: that it is empty, or what it holds instead."""
    looked_for = "/".join(INFERENCE_SUFFIXES)
    if not entries:
        return f"input folder {input_dir} is empty: no image ({looked_for}) to segment"
    names = sorted(p.name + "/" * p.is_dir() for p in entries)
    return f"input folder {input_dir} holds no image ({looked_for}) to segment, only: {_listing(names)}"


def prediction_path(
    image: str | Path, output_dir: str | Path, output_postfix: str = "seg", output_ext: str = ".nii.gz"
) -> Path:
    """Where ``SaveImaged`` (``separate_folder=False``) writes the prediction of ``image``: MONAI's own
    ``FolderLayout`` naming, ``<output_dir>/<stem>_<postfix><ext>`` with ``.nii.gz`` counting as one extension."""
    layout = FolderLayout(output_dir, postfix=output_postfix, extension=output_ext, parent=False, makedirs=False)
    return Path(layout.filename(subject=str(image)))


def _free_space_problem(output_dir: Path, shapes: Sequence[tuple[int, ...]]) -> str | None:
    """Whether the disk of ``output_dir`` lacks room for the largest prediction of ``shapes`` as uncompressed uint8
    voxels (at least :py:data:`MIN_FREE_MB`), so that a disk too small stops the run before its first case. A disk
    that fills later stops the run at the prediction that no longer fits, which is then not written at all
    (:py:class:`scripts.saving.AtomicSaveImaged`); the predictions before it are whole."""
    largest_mb = max((math.prod(shape[:3]) for shape in shapes), default=0) / 2**20
    problem = output_dir_problem("output_dir", output_dir, min_free_mb=max(MIN_FREE_MB, largest_mb))
    if problem is None:
        return None
    return (
        f"{problem} (the largest prediction takes {largest_mb:.1f} MB as uncompressed uint8 voxels); free disk "
        "space or choose another --output_dir"
    )


def _output_problems(
    input_dir: Path,
    output_dir: Path,
    image: Path,
    output_postfix: str,
    output_ext: str,
    shapes: Sequence[tuple[int, ...]] = (),
) -> list[str]:
    """Why predictions cannot go into ``output_dir``: it is (inside) the input folder, a file, not writable, or on a
    disk without room for predictions of ``shapes``. ``image`` is one input, to show what the next run would make
    of its prediction."""
    output, input_ = output_dir.resolve(), input_dir.resolve()
    if output.is_relative_to(input_):
        where = "the input folder" if output == input_ else f"inside the input folder {input_dir}"
        prediction = prediction_path(image, output_dir, output_postfix, output_ext)
        again = prediction_path(prediction, output_dir, output_postfix, output_ext).name
        return [
            f"output_dir {output_dir} is {where}: the predictions would be written among the images, and the next "
            f"run would segment them as images ({prediction.name} -> {again}); choose an --output_dir outside "
            f"{input_dir}"
        ]
    problem = output_dir_problem("output_dir", output_dir, min_free_mb=0) or _free_space_problem(output_dir, shapes)
    return [problem] if problem else []


def _duplicate_problems(outputs: dict[Path, Path]) -> list[str]:
    """Inputs that would write the same prediction (``case.nii`` and ``case.nii.gz``): one would overwrite the other."""
    by_output: dict[Path, list[Path]] = {}
    for image, output in outputs.items():
        by_output.setdefault(output, []).append(image)
    return [
        f"{' and '.join(str(image) for image in images)} would both be written as {output.name}; keep one of them "
        "in the input folder"
        for output, images in by_output.items()
        if len(images) > 1
    ]


def _is_empty_file(path: Path) -> bool:
    """Whether ``path`` is a file of 0 bytes, as a write interrupted before its first block leaves it."""
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def _existing_problem(output_dir: Path, outputs: Sequence[Path]) -> str | None:
    """The predictions of this run that ``output_dir`` already holds, which it would overwrite; the empty ones
    (0 bytes, left by an interrupted write) are named apart, as they are no predictions at all."""
    existing = sorted(dict.fromkeys(output for output in outputs if os.path.lexists(output)))
    if not existing:
        return None
    empty = [output.name for output in existing if _is_empty_file(output)]
    empties = f" ({len(empty)} of them empty, 0 bytes, from an interrupted write: {_listing(empty)})" if empty else ""
    return (
        f"output_dir {output_dir} already holds {len(existing)} prediction(s) this run would overwrite: "
        f"{_listing([output.name for output in existing])}{empties}; pass --overwrite true to replace them, or "
        "choose another --output_dir"
    )


def _read_image(path: Path, image_channels: int) -> tuple[Volume | None, str | None]:
    """The header of ``path`` (NIfTI: header and file size only), and why it is not a readable 3D image with
    ``image_channels`` channels and a usable affine, which its prediction is saved with."""
    try:
        volume = read_volume(path, with_data=False)
    except Exception as error:  # any library error of one file becomes a problem of that file
        return None, f"{path} cannot be read ({brief_error(error)})"
    problem = channel_problem(volume.shape, image_channels) or affine_problem(volume.affine)
    return volume, f"{path} {problem}" if problem else None


def _warn_thin_images(shapes: dict[Path, tuple[int, ...]]) -> None:
    """Warn about images one voxel thick along an axis: they are segmented (the prediction keeps their shape), but
    the network was trained on 3D patches and sees such an image only through padding."""
    thin = [f"{path} {shape[:3]}" for path, shape in shapes.items() if thin_axes(shape)]
    if thin:
        logger.warning(
            f"{len(thin)} image(s) one voxel thick along an axis, segmented although the network was trained on 3D "
            f"patches (expect a poor prediction): {_listing(thin)}"
        )


def _warn_leftover_temporaries(output_dir: Path, outputs: Iterable[Path]) -> None:
    """Warn about the temporary files of predictions that a killed run left in ``output_dir`` (hidden, named
    ``.<prediction>.<random><suffix>`` by :py:func:`scripts.utils.atomic_path`): they are no predictions."""
    if not output_dir.is_dir():
        return
    names = {output.name for output in outputs}
    leftover = sorted(path.name for path in output_dir.glob(".*") if atomic_temporary_target(path.name) in names)
    if leftover:
        logger.warning(
            f"output_dir {output_dir} holds {len(leftover)} temporary file(s) of an interrupted run, not "
            f"predictions; delete them: {_listing(leftover)}"
        )


def inference_cases(
    input_dir: str | Path,
    output_dir: str | Path,
    output_postfix: str = "seg",
    overwrite: bool | str = False,
    image_channels: int = 1,
    output_ext: str = ".nii.gz",
) -> list[dict[str, str]]:
    """
    The images of ``input_dir`` to segment, as the datalist ``[{"image": path}, ...]`` of ``configs/inference.json``,
    after checking every one of them and the output folder, so that a bad input stops the run before any case is
    segmented rather than after some, with a traceback that does not name the file.

    Images are the visible files with one of :py:data:`INFERENCE_SUFFIXES` (case-insensitive), sorted by name; other
    files are ignored. The problems, all reported at once: ``input_dir`` missing (with the closest folder name),
    empty or without images (saying what it holds); ``output_dir`` equal to or inside ``input_dir`` (the predictions
    would be segmented by the next run), a file, or not writable; two images giving the same prediction name
    (``case.nii`` and ``case.nii.gz``); predictions of this run already in ``output_dir``, unless ``overwrite`` (the
    empty ones, left by an interrupted write, named apart); less free space on its disk than the largest prediction
    takes as uncompressed uint8 voxels; symbolic links with an image's name that lead to no file (dangling, in a loop);
    images that cannot be read (NIfTI truncation included) or are not 3D with ``image_channels`` channels. Images
    one voxel thick along an axis are segmented, with a warning.

    Args:
        input_dir: folder of the images (``dataset_dir`` of ``configs/inference.json``).
        output_dir: folder of the predictions.
        output_postfix: ``SaveImaged``'s ``output_postfix``: a prediction is ``<stem>_<postfix><output_ext>``.
        overwrite: whether to replace existing predictions; a bool, or ``"true"``/``"false"`` from the command line.
        image_channels: number of image channels the network takes.
        output_ext: ``SaveImaged``'s ``output_ext``.

    Raises:
        InferenceInputError: listing every problem, one per line, each naming its folder or file.
    """
    try:
        overwrite = as_flag("overwrite", overwrite)
    except BundleInputError as error:
        raise InferenceInputError([str(error).rstrip(".")]) from None
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    problem = _missing_folder_problem(input_dir)
    if problem:
        raise InferenceInputError([problem])
    entries = sorted(p for p in input_dir.iterdir() if not p.name.startswith("."))
    images = [p for p in entries if _is_image(p)]
    link_problems = [problem for problem in map(_link_problem, entries) if problem]
    if not images:
        raise InferenceInputError(link_problems or [_no_image_problem(input_dir, entries)])
    outputs = {image: prediction_path(image, output_dir, output_postfix, output_ext) for image in images}
    headers = {image: _read_image(image, image_channels) for image in images}
    image_problems = [problem for _, problem in headers.values()]
    shapes = {image: volume.shape for image, (volume, problem) in headers.items() if volume and not problem}
    problems = _output_problems(input_dir, output_dir, images[0], output_postfix, output_ext, list(shapes.values()))
    if not problems and not overwrite:
        problems.append(_existing_problem(output_dir, list(outputs.values())))
    problems += _duplicate_problems(outputs) + link_problems + image_problems
    problems = [problem for problem in problems if problem]
    if problems:
        raise InferenceInputError(problems)
    _warn_thin_images(shapes)
    _warn_leftover_temporaries(output_dir, outputs.values())
    suffix = f"_{output_postfix}"
    looks_predicted = [image.name for image in images if output_postfix and case_id(str(image)).endswith(suffix)]
    if looks_predicted:
        logger.warning(f"inputs that look like predictions of an earlier run are segmented too: {looks_predicted}")
    replaced = sum(os.path.lexists(output) for output in outputs.values())
    logger.info(
        f"inference: {len(images)} image(s) of {input_dir} -> {output_dir}"
        + (f", replacing {replaced} existing prediction(s)" if replaced else "")
    )
    return [{"image": str(image)} for image in images]


def check_eval_data(
    datalist: str | Path,
    dataset_dir: str | Path | None = None,
    split: str = "test",
    num_classes: int = 3,
    image_channels: int = 1,
) -> dict[str, int]:
    """
    Check the evaluation split of a datalist and its files before any case is scored (``check_eval_data``, the
    first step of ``configs/evaluate.json``): :py:func:`scripts.checks.validate_datalist` on ``split`` alone, which
    must be non-empty and labelled, with label values in ``0..num_classes-1`` and labels on their image's grid.
    The other splits are not read: evaluation does not use them.

    Returns:
        ``{split: number of cases}``.

    Raises:
        EvaluationDataError: listing every problem, one per line, each naming its case and file.
    """
    try:
        counts = validate_datalist(
            datalist, dataset_dir, num_classes, [split], [split], image_channels=image_channels, splits=[split]
        )
    except DatalistError as error:  # name the datalist in the split-level problems, as evaluation reads it
        problems = [f"{datalist}: {p}" if p.startswith("split ") else p for p in error.problems]
        raise EvaluationDataError(problems) from None
    logger.info(f"evaluation datalist {datalist} OK: {split}={counts[split]}")
    return counts
