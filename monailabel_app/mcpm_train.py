"""MCPM training rounds from the datastore: the approved labels are the meta set, the meta network persists.

``MCPMTrainTask`` is MONAI Label's ``BundleTrainTask`` with four changes:

- the submitted labels a reviewer approved (MONAILabelReviewer's ``segmentationMeta.status`` ``"approved"`` on the
  ``final`` label), and those named in the ``meta_cases`` option, are the round's meta set; flagged labels are left
  out; the other submitted labels train as possibly noisy. A round without an approved or named label stops with
  an error: MCPM learns its weights from them.
- the round's datalist (training, meta and validation cases) is written to ``checkpoints/monailabel_datalist.json``
  and checked by the bundle's own datalist check before training (missing or unreadable files, label values,
  shapes), so bad input fails with the file named;
- the meta network starts from ``models/meta/meta_network.pt`` when a round saved one, and the round's best meta
  network (the pair of its best ``model.pt``) is copied there: scoring after a round uses the networks it trained.
  It lives in a subfolder, since MONAI Label offers every ``models/*.pt`` as a segmentation model;
- a round that has no validation case, or that ends without writing ``models/model.pt``, is an error, not "DONE".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mcpm_common import APPROVED, FLAGGED, META_NETWORK, orphan_labels, review_status, submitted
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

DATALIST = Path("checkpoints") / "monailabel_datalist.json"
APPROVE_HINT = (
    "approve a label in MONAILabelReviewer, or with PUT /datastore/label/info?label=<image id>&tag=final and the form "
    'field info={"segmentationMeta": {"status": "approved", "approvedBy": "<name>", "level": "", "comment": "", '
    '"editTime": 0}} (docs/monailabel.md)'
)


class MCPMTrainTask(BundleTrainTask):
    """``BundleTrainTask`` whose rounds take the approved labels as MCPM's meta set (see the module docstring)."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self._round: dict[str, list[dict[str, str]]] = {}

    def _fetch_datalist(self, request: dict[str, Any], datastore: Datastore) -> list[dict[str, str]]:
        """The submitted labels to train on as noisy; the approved and named ones are kept as the meta set, and
        flagged ones (a reviewer found them wrong) are left out until they are submitted again."""
        orphans = orphan_labels(datastore)
        if orphans:
            raise FileNotFoundError(
                f"submitted labels without their image: {orphans}; the datastore has dropped those images (and any "
                "approval of their labels): put the image files back in the studies folder, or delete the labels."
            )
        entries = submitted(datastore)
        if not entries:
            raise ValueError("no submitted (final) labels: submit labels, and approve a few you trust, before training.")
        named = {i.strip() for i in str(request.get("meta_cases", "")).split(",") if i.strip()}
        unknown = sorted(named - set(entries))
        if unknown:
            raise ValueError(f"meta_cases {unknown} name no image with a submitted (final) label.")
        status = {i: review_status(datastore, i) for i in entries}
        meta_ids = sorted(i for i in entries if status[i] == APPROVED or i in named)
        if not meta_ids:
            raise ValueError(
                f"no approved label among the {len(entries)} submitted: MCPM needs at least one trusted label as its "
                f"meta set, to learn which voxels of the others to trust; {APPROVE_HINT}."
            )
        flagged = sorted(i for i in entries if status[i] == FLAGGED and i not in meta_ids)
        self._round = {"meta": [entries[i] for i in meta_ids]}
        logger.info(f"meta set of this round (approved or named labels): {meta_ids}; left out as flagged: {flagged}")
        return [entry for i, entry in entries.items() if i not in meta_ids and i not in flagged]

    def _partition_datalist(
        self, datalist: list[dict[str, str]], request: dict[str, Any], shuffle: bool = False
    ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        train, validation = super()._partition_datalist(datalist, request, shuffle)
        if not train or not validation:
            raise ValueError(
                f"this round has {len(train or [])} training and {len(validation or [])} validation cases among the "
                f"{len(datalist)} submitted labels that are not in the meta set: a round needs both, since only "
                "validation writes models/model.pt; submit more labels or set val_split above 0 (default 0.2)."
            )
        self._round.update(training=train, validation=validation)
        return train, validation

    def _update_overrides(self, overrides: dict[str, Any]) -> None:
        """The meta set, the round's datalist and its check, and the meta network of the last round."""
        datalist = Path(self.bundle_path) / DATALIST
        datalist.parent.mkdir(parents=True, exist_ok=True)
        datalist.write_text(json.dumps(self._round, indent=2))
        files = [path for entries in self._round.values() for entry in entries for path in entry.values()]
        overrides.update(
            {
                "datalist": str(datalist),
                "dataset_dir": os.path.commonpath(files),  # the datastore's folder: its paths are absolute
                "validate_data": True,
                "train#meta_dataset#data": self._round["meta"],
            }
        )
        meta_network = Path(self.bundle_path) / META_NETWORK
        if meta_network.is_file():
            loader = {
                "_target_": "CheckpointLoader",
                "load_path": str(meta_network),
                "load_dict": {"meta_network": "@meta_network"},
            }
            overrides[self.const.key_train_handlers()].insert(0, loader)
            logger.info(f"the meta network starts from {meta_network}")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        request = {"meta_cases": "", **request}  # MONAI Label reads every displayable config from the request
        model = Path(self.bundle_path) / "models" / "model.pt"
        before = model.stat().st_mtime_ns if model.is_file() else None
        result = super().__call__(request, datastore)
        if not model.is_file() or model.stat().st_mtime_ns == before:
            raise RuntimeError(
                f"the round ended without writing {model}: no validation improved on it (check max_epochs against "
                "val_interval in the server log)."
            )
        best = Path(self.bundle_path) / "checkpoints" / "meta_network.pt"
        if best.is_file():
            target = Path(self.bundle_path) / META_NETWORK
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best, f"{target}.tmp")
            os.replace(f"{target}.tmp", target)
            logger.info(f"meta network of this round saved to {target}")
        return result
