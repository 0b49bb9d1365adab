"""What the app's tasks share: the model's name, the label tags and image-info keys they read and write, the
reviewer's approval as MONAILabelReviewer stores it, and a context that makes the bundle's ``scripts`` importable."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.utils.others.class_utils import unload_module

MODEL = "mcpm_segmentation"  # the bundle's folder in model/, the name the server gives it (tools/serve.py too)
FINAL = "final"  # the tag of submitted labels, the only ones training reads
SUSPICION = "mcpm_suspicion"  # the image-info key of a case's scores, written by scoring, read by the strategy
# the meta network a round trained, relative to the bundle: out of models/*.pt, which MONAI Label offers as models
META_NETWORK = Path("models") / "meta" / "meta_network.pt"
# where scoring writes each case's weight map, in the studies folder: not a label tag, since MONAILabelReviewer reads
# every tag as a version of the segmentation; the datastore lists only the files directly in the studies folder
WEIGHT_MAPS = "mcpm_weights"
# MONAILabelReviewer's label info: {"segmentationMeta": {"status": "approved" | "flagged" | "", "approvedBy",
# "level", "comment", "editTime"}} (plugins/slicer/MONAILabelReviewer, SegmentationMeta.getMeta)
REVIEW_KEY = "segmentationMeta"
APPROVED = "approved"
FLAGGED = "flagged"


def review_status(datastore: Datastore, image_id: str) -> str:
    """The reviewer's status of an image's ``final`` label: ``"approved"``, ``"flagged"`` or ``""`` (not reviewed)."""
    info: Any = datastore.get_label_info(image_id, FINAL) or {}
    meta = info.get(REVIEW_KEY)
    return str(meta.get("status", "")) if isinstance(meta, dict) else ""


def submitted(datastore: Datastore) -> dict[str, dict[str, str]]:
    """Each image with a submitted (``final``) label, by id in sorted order: its image and label files, as a datalist
    entry."""
    labelled = sorted(i for i in datastore.list_images() if datastore.get_label_by_image_id(i, FINAL))
    return {i: {"image": datastore.get_image_uri(i), "label": datastore.get_label_uri(i, FINAL)} for i in labelled}


def file_state(path: str | Path) -> str:
    """A file's modification time and size: what changes when it is rewritten (scoring records it per label)."""
    stat = Path(path).stat()
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def orphan_labels(datastore: Datastore) -> list[str]:
    """The submitted label files whose image is gone from the datastore (the datastore drops such an image, with its
    label's info and approval, when it notices the file missing); only a local datastore can tell."""
    local = getattr(datastore, "_datastore", None)
    if local is None or not hasattr(local, "label_path") or not hasattr(datastore, "_to_id"):
        return []
    folder = Path(local.label_path(FINAL))
    if not folder.is_dir():
        return []
    images = set(datastore.list_images())
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    # the datastore's own rule from file name to id (its extensions; an id may hold dots)
    return [str(f) for f in files if datastore._to_id(f.name)[0] not in images]


@contextlib.contextmanager
def bundle_on_path(bundle_path: str) -> Iterator[None]:
    """The bundle's own ``scripts`` importable inside the block, as MONAI Label's bundle tasks make it (the bundle
    first on ``sys.path``, any other ``scripts`` unloaded before and after)."""
    sys.path.insert(0, bundle_path)
    unload_module("scripts")
    try:
        yield
    finally:
        sys.path.remove(bundle_path)
        unload_module("scripts")
