"""MONAI Label app of the MCPM bundle: segmentation, MCPM training rounds whose meta set is the approved labels, a
label-suspicion scoring method and a review strategy that sends reviewers to the most suspect labels first.

``bash run.sh serve --studies DIR`` (``tools/serve.py``) copies this folder into ``apps/mcpm_review/`` beside the
bundle copy ``model/mcpm_segmentation/`` and starts the server offline; docs/monailabel.md walks through the loop.
"""

from __future__ import annotations

import logging
import os

from mcpm_common import MODEL
from mcpm_scoring import LabelSuspicion
from mcpm_strategy import MostSuspectLabel
from mcpm_train import MCPMTrainTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)


class MCPMReviewApp(MONAILabelApp):
    """The bundle in ``model/mcpm_segmentation``: its inference, its MCPM training, suspicion scoring and review."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_dir = os.path.join(app_dir, "model", MODEL)
        if not os.path.isdir(self.bundle_dir):
            raise FileNotFoundError(f"no bundle at {self.bundle_dir}: prepare the app with `bash run.sh serve`.")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MCPM label review",
            description="Segmentation trained with MCPM on noisy labels; the most suspect labels reviewed first",
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {MODEL: BundleInferTask(self.bundle_dir, self.conf)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL: MCPMTrainTask(self.bundle_dir, self.conf)}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"mcpm_suspect": MostSuspectLabel(self.conf.get("mcpm_ranking", "mean_loss")), "random": Random()}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"mcpm_suspicion": LabelSuspicion(self.bundle_dir)}
