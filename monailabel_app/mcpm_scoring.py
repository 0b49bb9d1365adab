"""Label-quality scoring: how much the trained MCPM networks distrust each submitted label, and where.

``LabelSuspicion`` runs the segmentation network and the meta network the last round trained (``models/model.pt``,
``models/meta/meta_network.pt``) over every image with a submitted label, through the bundle's audit
(``scripts.audit``: the loss map, the weight map, the case ranking). Per image it stores, in the image info under
``mcpm_suspicion``: ``score`` (the share of low-weight voxels around the labelled structures, the audit's), its
``rank``, the two simple scores a user could rank by instead (``mean_loss``, and ``dice_disagreement``,
1 − Dice of the label against the prediction), ``region``, the most suspect region (voxel bounds on the image's own
grid and its centre in world coordinates), ``weight_map``, the file of the case's weight map on the image's grid and
affine (in ``<studies>/mcpm_weights/``), for a viewer to overlay, and ``label_mtime``, which label file was scored.
A label the bundle's datalist check rejects (wrong values, another grid than its image's) is not scored: its record
holds ``error`` instead, and the other labels are scored.

The answer of a scoring request (``POST /scoring/mcpm_suspicion``) lists the scored ids by ``rank`` (``ranking``),
each one's scores and region (``scores``) and the labels not scored with why (``errors``).

A scoring run whose networks, config and labels have not changed since the last one does nothing: MONAI Label starts
one at server start, after each round and after every active-learning request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mcpm_common import META_NETWORK, SUSPICION, WEIGHT_MAPS, bundle_on_path, file_state, submitted
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

logger = logging.getLogger(__name__)
SCORES = ("score", "rank", "mean_loss", "dice_disagreement")


class LabelSuspicion(ScoringMethod):
    """Score every submitted label with the trained MCPM networks (see the module docstring)."""

    def __init__(self, bundle_path: str) -> None:
        super().__init__("MCPM label suspicion: the trained meta network's distrust of each submitted label")
        self.bundle = Path(bundle_path)

    def _fingerprint(self, entries: dict[str, dict[str, str]]) -> str:
        """What the scores depend on: the networks, the training config and every submitted label's file."""
        inputs = [self.bundle / "models" / "model.pt", self.bundle / META_NETWORK, self.bundle / "configs" / "train.json"]
        states = [file_state(p) for p in inputs] + [f"{i}:{file_state(e['label'])}" for i, e in entries.items()]
        return hashlib.sha1(";".join(states).encode()).hexdigest()

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        entries = submitted(datastore)
        fingerprint = self._fingerprint(entries)
        records = {i: datastore.get_image_info(i).get(SUSPICION, {}) for i in entries}
        if all(r.get("fingerprint") == fingerprint for r in records.values()) and not request.get("force"):
            return {"scored": 0, "unchanged": len(entries)}
        studies = Path(datastore.get_image_uri(next(iter(entries)))).parent
        results: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as tmp, bundle_on_path(str(self.bundle)):
            from scripts.audit import case_ranking, load_trained, score_cases
            from scripts.checks import DatalistError, validate_datalist
            from scripts.utils import write_nifti

            overrides = {"bundle_root": str(self.bundle), "dataset_dir": "/", "ckpt_dir": str(self.bundle / "models")}
            config = self.bundle / "configs" / "train.json"
            models = load_trained([config], overrides, meta_network_path=self.bundle / META_NETWORK)
            num_classes = models.parser.get_parsed_content("num_classes")
            good = {}
            for image_id, entry in entries.items():  # one label that fails the check must not stop the others
                one = Path(tmp) / f"{image_id}.json"
                one.write_text(json.dumps({"training": [entry]}))
                try:
                    validate_datalist(one, Path("/"), num_classes, splits_required=("training",))
                    good[image_id] = entry
                except DatalistError as error:
                    results[image_id] = {"error": "; ".join(error.problems)}
            datalist = Path(tmp) / "datalist.json"
            datalist.write_text(json.dumps({"training": list(good.values())}))
            cases = list(score_cases(models, datalist=datalist, on_image_grid=True)) if good else []
            rows = {row["case"]: row for row in case_ranking(cases)}
            for (image_id, entry), case in zip(good.items(), cases, strict=True):
                weight_map = studies / WEIGHT_MAPS / f"{image_id}_weight.nii.gz"
                write_nifti(case.weight.astype(np.float32), case.affine, weight_map)
                row = rows[case.name]
                results[image_id] = {
                    **{key: row[key] for key in SCORES},
                    "region": {key.removeprefix("region_"): row[key] for key in row if key.startswith("region_")},
                    "weight_map": str(weight_map),
                    "label_mtime": file_state(entry["label"]),
                }
        # every record written at the end, one after the other, so that the datastore file is rewritten as briefly
        # as possible while the server may be writing an approval to it
        for image_id, record in results.items():
            datastore.update_image_info(image_id, {SUSPICION: {**record, "fingerprint": fingerprint}})
        logger.info(f"scored {len(good)} of {len(entries)} labels with the networks of {self.bundle / 'models'}")
        for image_id, record in results.items():
            if "error" in record:
                logger.warning(f"label of {image_id} not scored: {record['error']}")
        ranking = sorted((i for i, r in results.items() if "rank" in r), key=lambda i: results[i]["rank"])
        errors = {i: r["error"] for i, r in results.items() if "error" in r}
        scores = {i: {key: results[i][key] for key in (*SCORES, "region")} for i in ranking}
        return {"scored": len(ranking), "ranking": ranking, "scores": scores, "errors": errors}
