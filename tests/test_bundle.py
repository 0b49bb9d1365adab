"""The bundle through MONAI's own tools: `monai.bundle run` for train, baseline, evaluate and inference
(from another folder and from the bundle root), metadata, workflow properties, net in/out and export."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import BUNDLE_ROOT, CONFIGS, TINY, bundle


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    """MCPM training run from an unrelated folder with an absolute config path and --bundle_root."""
    out = tmp_path_factory.mktemp("mcpm")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = bundle(
        "run", ["train.json"], elsewhere, bundle_root=BUNDLE_ROOT, dataset_dir=dataset, ckpt_dir=out / "models",
        output_dir=out, **TINY,
    )
    (out / "train.log").write_text(result.stdout + result.stderr)
    return out


def test_train_shows_progress_and_epoch_statistics(trained):
    log = (trained / "train.log").read_text()
    assert re.search(rf"Epoch \[{TINY['epochs']}/{TINY['epochs']}\]: \[\d/2\]", log)  # ignite's progress bar
    assert "datalist" in log and "OK: training=4 meta=2" in log  # the data check ran first
    assert "weight_corrupted" in log and "meta_loss" in log


def test_train_writes_checkpoints(trained):
    models = trained / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert "model.0.conv.unit0.conv.weight" in state  # a plain UNet state dict, as the model zoo expects
    assert (models / "meta_network.pt").is_file()
    final = torch.load(models / "checkpoint_final.pt", weights_only=True)
    assert {"model", "meta_network", "optimizer", "meta_optimizer", "trainer"} <= set(final)
    assert "teacher" not in final  # only the teacher correction has one
    assert final["trainer"]["iteration"] == TINY["epochs"] * final["trainer"]["epoch_length"]
    tags = {"images": set(), "scalars": set()}
    for events in trained.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for kind in tags:
            tags[kind].update(accumulator.Tags()[kind])
    assert {"train_loss", "meta_loss", "weight_mean", "weight_corrupted", "weight_unchanged", "val_mean_dice"} <= tags["scalars"]
    assert tags["images"] == {"image_label_weight"}


def test_teacher_correction_saves_its_teacher(dataset, tmp_path):
    bundle(
        "run", ["train.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset, ckpt_dir=tmp_path / "models",
        output_dir=tmp_path, **TINY, **{"mcpm#correction": "teacher", "mcpm#weight_normalisation": "mean"},
    )
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    # the mean teacher, an average of the network's states: the network's keys, other values
    assert set(final["teacher"]) == set(final["model"])
    assert not all(torch.equal(final["teacher"][k], final["model"][k]) for k in final["model"])


def test_resume_continues_training(trained, dataset, tmp_path):
    bundle(
        "run", ["train.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, **{**TINY, "epochs": 3},
        **{"train#resume_from": trained / "models" / "checkpoint_final.pt"},
    )
    final = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 3 * final["trainer"]["epoch_length"]


def test_train_reports_every_data_problem_before_training(dataset, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(dataset, broken)
    datalist = json.loads((broken / "datalist.json").read_text())
    datalist["meta"] = []
    (broken / datalist["training"][1]["label"]).unlink()
    (broken / "datalist.json").write_text(json.dumps(datalist))
    result = bundle(
        "run", ["train.json"], tmp_path, expect_success=False, bundle_root=BUNDLE_ROOT, dataset_dir=broken,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, **TINY,
    )
    assert "at least one clean meta case" in result.stderr
    assert datalist["training"][1]["label"] in result.stderr
    assert not (tmp_path / "models").exists()


def test_baseline_from_bundle_root(dataset, tmp_path):
    bundle(
        "run", ["train.json", "train_baseline.json"], BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path, **TINY,
    )
    assert (tmp_path / "models" / "model.pt").is_file()
    assert not (tmp_path / "models" / "meta_network.pt").exists()
    assert "meta_network" not in torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)


def test_evaluate_writes_per_case_dice(trained, dataset, tmp_path):
    bundle(
        "run", ["train.json", "evaluate.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=trained / "models", output_dir=tmp_path, **TINY,
    )
    with open(tmp_path / "val_mean_dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["filename"]).name for r in rows) == sorted(p.name for p in (dataset / "imagesTs").iterdir())
    assert all(0 <= float(r["class0"]) <= 1 for r in rows)
    assert (tmp_path / "val_hd95_raw.csv").is_file()


def test_inference_writes_predictions_on_the_input_grid(trained, dataset, tmp_path):
    out = tmp_path / "predictions"
    bundle(
        "run", ["inference.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset / "imagesTs",
        ckpt_path=trained / "models" / "model.pt", output_dir=out, patch_size="[16,16,16]",
        **{k: v for k, v in TINY.items() if k.startswith("network_def")},
    )
    for image_path in sorted((dataset / "imagesTs").iterdir()):
        name = image_path.name.replace(".nii.gz", "_seg.nii.gz")
        image, pred = nib.load(image_path), nib.load(out / name)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_metadata_validates_against_schema():
    schema = BUNDLE_ROOT / "tests" / "fixtures" / "meta_schema_20240725.json"
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(schema))


@pytest.mark.parametrize("config, workflow_type, data", [("train.json", "train", ""), ("inference.json", "inference", "imagesTs")])
def test_workflow_properties(config, workflow_type, data, dataset, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / config), workflow_type=workflow_type, logging_file=False,
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(dataset / data), output_dir=str(tmp_path),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


@pytest.mark.parametrize("enabled", [True, False])
def test_cudnn_benchmark_is_set_after_set_determinism(enabled, dataset, tmp_path, monkeypatch):
    """``cudnn_benchmark`` (on by default) is set in ``run``, after MONAI's ``set_determinism`` in ``initialize``
    turned it off and before training; ``--cudnn_benchmark false`` keeps cuDNN deterministic. The multi-GPU
    override keeps the same order."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not enabled)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", enabled)
    overrides = {} if enabled else {"cudnn_benchmark": "false"}
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", logging_file=False,
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(dataset), output_dir=str(tmp_path), **overrides,
    )
    workflow.initialize()
    assert torch.backends.cudnn.benchmark is False  # set_determinism's
    workflow.parser.get_parsed_content("cudnn_benchmark_setting")
    assert torch.backends.cudnn.benchmark is enabled and torch.backends.cudnn.deterministic is (not enabled)
    for name in ("train.json", "multi_gpu_train.json"):
        run = json.loads((CONFIGS / name).read_text())["run"]
        assert run.index("@checks") < run.index("@cudnn_benchmark_setting") < len(run) - 1, name
        assert "trainer.run()" in run[-1]


def test_verify_net_in_out_and_ckpt_export(trained, tmp_path):
    bundle("verify_net_in_out", ["inference.json"], tmp_path, net_id="network_def", meta_file=CONFIGS / "metadata.json", n=2)
    exported = tmp_path / "model.ts"
    bundle(
        "ckpt_export", ["inference.json"], tmp_path, net_id="network_def", filepath=exported,
        ckpt_file=trained / "models" / "model.pt", meta_file=CONFIGS / "metadata.json",
        **{k: v for k, v in TINY.items() if k.startswith("network_def")},
    )
    module = torch.jit.load(str(exported))
    assert module(torch.rand(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
