"""
Guards for the folders a training run writes to, so that a run never replaces what a user made.

:py:func:`check_training_outputs`, which ``configs/train.json`` runs before training (``check_outputs``), refuses:

- an output folder (``ckpt_dir``, ``model_dir``, ``output_dir``) that is ``dataset_dir`` or inside it;
- a ``model.pt`` or ``meta_network.pt`` in the folders the run writes that is not weights this bundle wrote;
- the bundle's shipped weights (the md5 sums of ``large_files.yml``) there, unless ``overwrite`` is true;
- a fresh run (no resume) into a folder that holds the checkpoints or best weights of an earlier run, unless
  ``overwrite`` is true: then the earlier run's checkpoints are deleted when training starts (by
  ``scripts.checkpointing.TrainingCheckpointer``, after the data checks), and its best weights are replaced at
  the new run's first validation.

Each refusal is a :py:class:`OutputFolderError` (a :py:class:`scripts.checks.BundleInputError`) naming the folder,
the files and the ways out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from scripts.checkpointing import run_files
from scripts.checks import BundleInputError
from scripts.utils import as_flag, file_hash

__all__ = [
    "BEST_WEIGHTS",
    "DatasetFolderError",
    "ExistingRunError",
    "ForeignWeightsError",
    "OutputFolderError",
    "ShippedWeightsError",
    "check_training_outputs",
]

logger = logging.getLogger(__name__)

# the best-validation weights, written by the validation CheckpointSavers of configs/train.json
BEST_WEIGHTS = ("model.pt", "meta_network.pt")
WAYS_OUT = (
    "resume that run with --train#resume_from latest, or start over with --overwrite true (which deletes its "
    "checkpoints when training starts and replaces its best weights at the new run's first validation)"
)


class OutputFolderError(BundleInputError):
    """A folder a training run would write to, or a file in it, that the run must not replace."""


class DatasetFolderError(OutputFolderError):
    """An output folder that is the dataset folder or inside it."""


class ForeignWeightsError(OutputFolderError):
    """A ``model.pt`` or ``meta_network.pt`` where the run writes that is not weights this bundle wrote."""


class ShippedWeightsError(OutputFolderError):
    """The bundle's shipped weights where a run would write its best weights, without ``overwrite``."""


class ExistingRunError(OutputFolderError):
    """A fresh run into a folder that holds the checkpoints or best weights of an earlier run, without
    ``overwrite``."""


def _is_state_dict(value: object) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(torch.is_tensor(v) for v in value.values())


def _foreign_reason(path: Path) -> str | None:
    """Why ``path`` is not best weights this bundle wrote (a network state dict, or a dict holding one under
    ``model``/``meta_network``), or None when it is."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever it is, it is not one of ours
        return f"it does not load as weights ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    if _is_state_dict(content):
        return None
    if isinstance(content, Mapping) and any(_is_state_dict(content.get(key)) for key in ("model", "meta_network")):
        return None
    return f"it holds a {type(content).__name__}, not a network's state dict"


def _shipped_hashes(shipped_list: str | Path | None) -> set[str]:
    """The md5 sums of the weights ``large_files.yml`` lists (none when the file is absent)."""
    if not shipped_list or not Path(shipped_list).is_file():
        return set()
    import yaml

    entries = (yaml.safe_load(Path(shipped_list).read_text()) or {}).get("large_files") or []
    return {str(e["hash_val"]).lower() for e in entries if str(e.get("hash_type", "md5")).lower() == "md5"}


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else items[0]


def _listed(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def check_training_outputs(
    ckpt_dir: str | Path,
    model_dir: str | Path,
    output_dir: str | Path,
    dataset_dir: str | Path,
    resume_path: str | Path = "",
    overwrite: bool | str = False,
    shipped_list: str | Path | None = None,
) -> None:
    """Refuse, before any training, a run that would write into ``dataset_dir`` or replace files it did not make.

    Args:
        ckpt_dir: folder of the training checkpoints and ``meta_network.pt``.
        model_dir: folder of the best ``model.pt``.
        output_dir: folder of the TensorBoard logs.
        dataset_dir: the dataset's folder, which no output folder may be or be inside.
        resume_path: the checkpoint the run resumes from (``train#resume_path``); empty for a fresh run.
        overwrite: whether a fresh run may start over in a folder holding an earlier run, and a run may replace
            the shipped weights. On a fresh run the TrainingCheckpointer deletes the earlier checkpoints when training starts.
        shipped_list: ``large_files.yml``, whose md5 sums identify the shipped weights.

    Raises:
        OutputFolderError: one of its subclasses, naming the folder, the files and the ways out.
    """
    overwrite = as_flag("overwrite", overwrite)
    folders = {"ckpt_dir": Path(ckpt_dir), "model_dir": Path(model_dir), "output_dir": Path(output_dir)}
    dataset = Path(dataset_dir).resolve()
    inside: dict[Path, list[str]] = {}
    for name, folder in folders.items():
        if folder.resolve().is_relative_to(dataset):
            inside.setdefault(folder, []).append(name)
    if inside:
        named = [f"{_and(names)} {folder}" for folder, names in inside.items()]
        verb = "is" if len(named) == 1 and len(next(iter(inside.values()))) == 1 else "are"
        raise DatasetFolderError(
            f"{_and(named)} {verb} the dataset folder (dataset_dir {dataset_dir}) or inside it: training "
            "would write beside the dataset's files and may replace them; choose other folders, e.g. --ckpt_dir "
            "runs/<name>/models --output_dir runs/<name>."
        )

    # the best weights the validation savers write: model.pt in model_dir, meta_network.pt in ckpt_dir
    weights: dict[Path, Path] = {}
    for folder in (folders["model_dir"], folders["ckpt_dir"]):
        for name in BEST_WEIGHTS:
            path = folder / name
            if path.is_file():
                weights.setdefault(path.resolve(), path)
    foreign = [f"{path} ({reason})" for path in weights.values() if (reason := _foreign_reason(path))]
    if foreign:
        raise ForeignWeightsError(
            "training would replace files that are not weights this bundle wrote: "
            + "; ".join(foreign)
            + ". Move them away or train into another folder (--ckpt_dir, --model_dir); --overwrite true does not "
            "replace them."
        )
    hashes = _shipped_hashes(shipped_list)
    shipped = [path for path in weights.values() if hashes and file_hash(path, "md5") in hashes]
    if shipped and not overwrite:
        folder_names = sorted({str(path.parent) for path in shipped})
        raise ShippedWeightsError(
            f"{', '.join(folder_names)} holds the bundle's shipped weights ({_listed(shipped)}, listed in "
            "large_files.yml), which this run would replace: train into a folder of your own (--ckpt_dir "
            "runs/<name>/models --output_dir runs/<name>), or pass --overwrite true to replace them."
        )
    if resume_path:
        return

    checkpoints = run_files(folders["ckpt_dir"])
    if not checkpoints and not weights:
        return
    if not overwrite:
        by_folder: dict[Path, list[Path]] = {}
        for path in [*checkpoints, *weights.values()]:
            by_folder.setdefault(path.parent, []).append(path)
        held = "; ".join(f"{folder}: {_listed(paths)}" for folder, paths in by_folder.items())
        raise ExistingRunError(
            f"a fresh run (no --train#resume_from) would overwrite an earlier training run's files in {held}. "
            f"To continue, {WAYS_OUT}."
        )
    if checkpoints:
        # deleted by the TrainingCheckpointer when training starts, after the data are loaded and checked, so
        # that a later refusal leaves them in place
        logger.info(f"overwrite: {_listed(checkpoints)} of the earlier run will be deleted when training starts")
    if weights:
        logger.info(
            f"overwrite: {_listed(list(weights.values()))} of the earlier run will be replaced at this run's first "
            "validation"
        )
