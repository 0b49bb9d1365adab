"""Label-quality scoring: how much the trained MCPM networks distrust each submitted label, and where.

``LabelSuspicion`` runs the segmentation network and the meta network the last round trained (``models/model.pt``,
``models/meta/meta_network.pt``) over every image with a submitted label, through the bundle's audit
(``scripts.audit``: the loss map, the weight map, the case ranking). Per image it stores, in the image info under
``mcpm_suspicion``: ``score`` (the share of low-weight voxels around the labelled structures, the audit's), its
``rank``, the two simple scores a user could rank by instead (``mean_loss``, and ``dice_disagreement``,
1 − Dice of the label against the prediction), and ``region``, the most suspect region (voxel bounds on the image's
own grid and its centre in world coordinates). The weight map itself is saved as the label tag ``mcpm_weight`` on
the image's grid and affine, for a viewer to overlay (``GET /datastore/label?label=<id>&tag=mcpm_weight``).

A scoring run whose networks and labels have not changed since the last one does nothing: MONAI Label starts one at
server start, after each round and after every active-learning request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mcpm_common import FINAL, SUSPICION, WEIGHT_TAG, bundle_on_path, labelled_images
from mcpm_train import META_NETWORK
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

logger = logging.getLogger(__name__)


class LabelSuspicion(ScoringMethod):
    """Score every submitted label with the trained MCPM networks (see the module docstring)."""

    def __init__(self, bundle_path: str) -> None:
        super().__init__("MCPM label suspicion: the trained meta network's distrust of each submitted label")
        self.bundle_path = bundle_path

    def _networks(self) -> tuple[Path, Path]:
        bundle = Path(self.bundle_path)
        return bundle / "models" / "model.pt", bundle / META_NETWORK

    def _fingerprint(self, datastore: Datastore, images: list[str]) -> str:
        """What the scores depend on: the networks' files and every scored label's submission time."""
        networks = [f"{p.name}:{p.stat().st_mtime_ns}" for p in self._networks() if p.is_file()]
        labels = [f"{i}:{(datastore.get_label_info(i, FINAL) or {}).get('ts')}" for i in images]
        return hashlib.sha1(";".join(networks + labels).encode()).hexdigest()

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        images = labelled_images(datastore)
        fingerprint = self._fingerprint(datastore, images)
        current = [datastore.get_image_info(i).get(SUSPICION, {}).get("fingerprint") == fingerprint for i in images]
        if not images or (all(current) and not request.get("force")):
            return {"scored": 0, "unchanged": len(images)}
        model, meta_network = self._networks()
        if not meta_network.is_file():  # the bundle's shipped meta network, before the first round
            meta_network = Path(self.bundle_path) / "models" / "meta_network.pt"
        entries = [{"image": datastore.get_image_uri(i), "label": datastore.get_label_uri(i, FINAL)} for i in images]
        with tempfile.TemporaryDirectory() as tmp, bundle_on_path(self.bundle_path):
            from scripts.audit import case_ranking, load_trained, score_cases
            from scripts.utils import write_nifti

            datalist = Path(tmp) / "datalist.json"
            datalist.write_text(json.dumps({"training": entries}))
            overrides = {"bundle_root": self.bundle_path, "dataset_dir": tmp, "ckpt_dir": str(model.parent)}
            models = load_trained(
                [Path(self.bundle_path) / "configs" / "train.json"], overrides, meta_network_path=meta_network
            )
            cases = list(score_cases(models, datalist=datalist, on_image_grid=True))
            rows = {row["case"]: row for row in case_ranking(cases)}
            for image_id, case in zip(images, cases, strict=True):
                weight_file = write_nifti(case.weight.astype(np.float32), case.affine, Path(tmp) / f"{image_id}.nii.gz")
                datastore.save_label(image_id, str(weight_file), WEIGHT_TAG, {"source": "mcpm_suspicion"})
                row = rows[case.name]
                scores = {key: row[key] for key in ("score", "rank", "mean_loss", "dice_disagreement")}
                region = {key.removeprefix("region_"): row[key] for key in row if key.startswith("region_")}
                datastore.update_image_info(
                    image_id, {SUSPICION: {**scores, "region": region, "fingerprint": fingerprint}}
                )
        logger.info(f"scored {len(images)} labels with {model} and {meta_network}")
        return {"scored": len(images), "ranking": [row["case"] for row in sorted(rows.values(), key=lambda r: r["rank"])]}
