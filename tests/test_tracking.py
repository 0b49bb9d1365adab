"""MLflow experiment tracking through `python -m monai.bundle run ... --tracking mlflow`, offline, with a local
SQLite store: the run, its parameters, the MCPM epoch statistics, the training loss and the validation Dice."""

from __future__ import annotations

import signal
import time

import mlflow
import pytest

from tests.conftest import BUNDLE_ROOT, TINY, bundle

# MLflow 3.17's SQL store uses an SQLAlchemy 2.1 loader option that SQLAlchemy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

DEADLINE_S = 240  # a tiny run takes ~15 s; anything near this means MLflow is waiting on something


@pytest.fixture(autouse=True)
def _offline_mlflow(monkeypatch):
    """Keep MLflow local: no tracking server from the caller's environment, no telemetry, and no hanging."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")

    def _timeout(signum, frame):  # subprocess.run kills its child when this interrupts it
        raise TimeoutError(f"monai.bundle run with --tracking mlflow took over {DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(DEADLINE_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _the_run(tracking_uri: str, experiment_name: str) -> tuple[mlflow.MlflowClient, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None and experiment.lifecycle_stage == "active"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # trainer and validator share one run
    return client, runs[0]


def test_mlflow_logs_mcpm_training_to_sqlite(dataset, tmp_path):
    db = tmp_path / "tracking" / "mlruns.db"
    tracking_uri = f"sqlite:///{db}"
    executed_config = tmp_path / "config_executed.json"
    started = time.time()
    bundle(
        "run", ["train.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=tmp_path / "out", **TINY,
        tracking="mlflow", tracking_uri=tracking_uri, experiment_name="mcpm_test", run_name="tiny",
        # given explicitly: MONAI 1.6.1 builds the default path as "<output_dir> + '/config_<time>.json'",
        # which is not a real path when --output_dir is a plain string, so the artifact would be skipped
        save_execute_config=executed_config,
    )
    assert db.is_file()
    client, run = _the_run(tracking_uri, "mcpm_test")
    assert run.info.run_name == "tiny"
    assert run.info.status == "FINISHED" and run.info.end_time >= started * 1000 - 1000

    epochs, warmup, val_interval = TINY["epochs"], TINY["mcpm#warmup_epochs"], TINY["val_interval"]
    assert int(run.data.params["max_epochs"]) == epochs
    epoch_length = int(run.data.params["epoch_length"])
    run_id = run.info.run_id
    # MLFlowHandler on the trainer: the loss (and the learning rate) every iteration, step = iteration
    assert _history(client, run_id, "train_loss") == list(range(1, epochs * epoch_length + 1))
    assert _history(client, run_id, "lr_group_0") == list(range(1, epochs * epoch_length + 1))
    # ... and engine.state.metrics every epoch, step = epoch; meta steps only start after the warm-up
    for key in ("weight_mean", "weight_corrupted", "weight_unchanged"):
        assert _history(client, run_id, key) == list(range(1, epochs + 1)), key
    assert _history(client, run_id, "meta_loss") == list(range(warmup + 1, epochs + 1))
    assert 0.0 <= run.data.metrics["weight_mean"] <= 1.0
    # MLFlowHandler on the evaluator: its key metric at the trainer's epoch of each validation
    assert _history(client, run_id, "val_mean_dice") == list(range(val_interval, epochs + 1, val_interval))
    assert 0.0 <= run.data.metrics["val_mean_dice"] <= 1.0

    assert executed_config.is_file()
    assert [a.path for a in client.list_artifacts(run_id)] == [executed_config.name]
    # artifacts go to an mlruns folder next to the database, never to a server
    assert (db.parent / "mlruns" / run_id / "artifacts" / executed_config.name).is_file()
    # TensorBoard logging goes on as before
    assert list((tmp_path / "out").glob("events.out.tfevents.*"))


def test_mlflow_defaults_to_sqlite_in_output_dir(dataset, tmp_path):
    """The plain `--tracking mlflow`: the database lands in <output_dir>/mlruns.db, experiment monai_experiment."""
    out = tmp_path / "out"
    bundle(
        "run", ["train.json"], tmp_path, bundle_root=BUNDLE_ROOT, dataset_dir=dataset,
        ckpt_dir=tmp_path / "models", output_dir=out, **{**TINY, "epochs": 1, "mcpm#warmup_epochs": 0}, tracking="mlflow",
    )
    client, run = _the_run(f"sqlite:///{out / 'mlruns.db'}", "monai_experiment")
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("run_")
    assert _history(client, run.info.run_id, "val_mean_dice") == [1]
    assert list(out.glob("config_*.json")), "the executed config was not saved"
    assert not (tmp_path / "mlruns.db").exists()  # not in the working directory either
