"""The review strategy: the submitted label the trained networks distrust most, not yet reviewed, comes next."""

from __future__ import annotations

import math
from typing import Any

from mcpm_common import APPROVED, FLAGGED, SUSPICION, file_state, review_status, submitted
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

# the case scores a ranking can use: the meta network's, and the two simple ones (scripts.audit.RANKINGS)
RANKINGS = ("score", "mean_loss", "dice_disagreement")


class MostSuspectLabel(Strategy):
    """``/activelearning/mcpm_suspect``: of the images whose submitted label no reviewer has approved or flagged, the
    one with the highest suspicion (``mcpm_suspicion`` scoring; the request's ``ranking`` picks which score: by
    default the mean loss, which ranked the corrupted labels of the default data better than the meta network's
    ``score``, docs/monailabel.md); labels not scored yet come last, in id order. Nothing when every label is
    reviewed, so the viewers' "Next sample" walks reviewers through the worst labels first."""

    def __init__(self, ranking: str = "mean_loss") -> None:
        super().__init__("MCPM review: the most suspect submitted label not yet reviewed")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}.")
        self.ranking = ranking

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        ranking = request.get("ranking", self.ranking)
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}.")
        candidates = []
        for image_id, entry in submitted(datastore).items():
            if review_status(datastore, image_id) in (APPROVED, FLAGGED):
                continue
            record = datastore.get_image_info(image_id).get(SUSPICION, {})
            # a score of another version of the label (resubmitted since) does not count
            current = record.get("label_mtime") == file_state(entry["label"])
            score = record.get(ranking) if current else None
            candidates.append((-math.inf if score is None else float(score), image_id))
        if not candidates:
            return {}
        # highest score first; among equal scores (or none yet), the first id
        score, image_id = min(candidates, key=lambda c: (-c[0], c[1]))
        return {"id": image_id, "suspicion": None if math.isinf(score) else score, "ranking": ranking}
