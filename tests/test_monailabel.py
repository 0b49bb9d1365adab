"""MONAI Label 0.8.5 serving the bundle: a real `monailabel start_server` with its monaibundle app, offline, on
127.0.0.1, segments a NIfTI volume and runs one MCPM training round on labels submitted to its datastore.

MONAI Label needs torch 2.14.1 with torchvision (requirements-monailabel.txt), so it lives in .venv-monailabel, which
`bash run.sh test` builds; this test drives it through a subprocess and HTTP. MCPM_SKIP_MONAILABEL=1 skips it, for
quick local runs only: CI runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from scripts.data.synthetic import generate_dataset
from tests.conftest import BUNDLE_ROOT

VENV_PYTHON = BUNDLE_ROOT / ".venv-monailabel" / "bin" / "python"
# not the venv's `monailabel` script: that runs whichever `python` is first on PATH, with the venv's parent folder (here
# the bundle root) put on PYTHONPATH
MONAILABEL = [VENV_PYTHON, "-m", "monailabel.main"]
MODEL = "mcpm_segmentation"  # the monaibundle app takes the task type from the folder name
BUNDLE_FILES = ("LICENSE", "configs", "scripts", "models/model.pt")
# Test-only additions to the MONAI Label training config: patches as large as the 32^3 volumes, and meta steps from
# the first (only) epoch on.
TINY = {"patch_size": [32, 32, 32], "mcpm#warmup_epochs": 0}
START_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 180
HTTP_TIMEOUT_S = 60
# 127.0.0.1 only, never through a proxy that the environment may name
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.skipif(
    os.environ.get("MCPM_SKIP_MONAILABEL") == "1", reason="MCPM_SKIP_MONAILABEL=1 (local quick runs only)"
)


@dataclass
class Server:
    url: str
    bundle: Path  # the bundle copy inside the app, which training rewrites
    log: Path
    images: dict[str, Path]  # datastore image id -> original file
    labels: dict[str, Path]  # id -> label file of the cases that get one
    meta_case: str
    test_case: str

    def call(self, method: str, path: str, data: bytes | None = None, content_type: str = "application/json") -> bytes:
        """One HTTP request; fails with the server's answer and log tail on an error status."""
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})
        try:
            with HTTP.open(request, timeout=HTTP_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            pytest.fail(f"{method} {path} -> {error.code} {error.read()[-2000:]!r}\n{self.log_tail()}")

    def json(self, method: str, path: str, body: dict | None = None) -> dict:
        return json.loads(self.call(method, path, None if body is None else json.dumps(body).encode()))

    def log_tail(self, chars: int = 5000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def log_since(self, offset: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def infer(self, image: str) -> bytes:
        """The label map of a datastore image, as the NIfTI file the server returns."""
        return self.call("POST", f"/infer/{MODEL}?image={image}&output=image", b"")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(field: str, path: Path) -> tuple[bytes, str]:
    """A multipart/form-data body holding one file, and its content type."""
    boundary = uuid.uuid4().hex
    # HTTP quotes the names with double quotes, which `!r` would not write
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{path.name}"\r\n\r\n'  # noqa: B907
    return head.encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _case_id(path: str) -> str:
    """The datastore's id of an image: its file name without the extension."""
    return Path(path).name.removesuffix(".nii.gz")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def install_bundle(model_dir: Path) -> Path:
    """Copy the bundle into a monaibundle app's model folder as docs/monailabel.md does, with the MONAI Label
    training override merged into its train.json (the only training config MONAI Label reads)."""
    target = model_dir / MODEL
    for name in BUNDLE_FILES:
        source, copy = BUNDLE_ROOT / name, target / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy)
    configs = [BUNDLE_ROOT / "configs" / name for name in ("train.json", "train_monailabel.json")]
    parser = ConfigParser(ConfigParser.load_config_files(configs))
    for key, value in TINY.items():
        parser[key] = value
    ConfigParser.export_config_file(parser.get(), target / "configs" / "train.json", indent=4)
    return target


def _wait_until_up(server: Server, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"monailabel start_server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with HTTP.open(server.url + "/info/", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the server did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    """End the server and the training processes it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    if not VENV_PYTHON.is_file():
        pytest.fail(
            f"{VENV_PYTHON} is missing: `bash run.sh test` builds .venv-monailabel from requirements-monailabel.txt "
            "(set MCPM_SKIP_MONAILABEL=1 to skip the MONAI Label tests in quick local runs)."
        )
    tmp = tmp_path_factory.mktemp("monailabel")
    data = tmp / "data"
    generate_dataset(data, seed=5, num_training=3, num_meta=1, num_validation=1, num_test=1, shape=(32, 32, 32))
    datalist = json.loads((data / "datalist.json").read_text())
    studies = tmp / "studies"
    studies.mkdir()
    cases = {split: {_case_id(e["image"]): e for e in datalist[split]} for split in ("training", "meta", "validation", "test")}
    images = {case: data / e["image"] for split in cases.values() for case, e in split.items()}
    labels = {case: data / e["label"] for split in ("training", "meta", "validation") for case, e in cases[split].items()}
    for image in images.values():
        shutil.copy(image, studies)

    app = tmp / "apps" / "monaibundle"
    download = [*MONAILABEL, "apps", "--download", "--name", "monaibundle", "--output", app.parent]
    subprocess.run(download, check=True, capture_output=True, timeout=120)
    bundle = install_bundle(app / "model")

    port = _free_port()
    log = tmp / "server.log"
    command = [
        *MONAILABEL, "start_server", "--app", app, "--studies", studies, "--host", "127.0.0.1", "--port", str(port),
        "--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "sam2", "false",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    result = Server(f"http://127.0.0.1:{port}", bundle, log, images, labels, next(iter(cases["meta"])), next(iter(cases["test"])))
    try:
        _wait_until_up(result, process)
        yield result
    finally:
        _stop(process)


def test_server_offers_the_bundle_for_inference_and_training(server):
    info = server.json("GET", "/info/")
    assert info["models"][MODEL]["labels"] == {"blob": 1, "tube": 2}
    assert info["models"][MODEL]["type"] == "segmentation"
    assert info["trainers"][MODEL]["config"]["meta_cases"] == ""
    assert info["models"][MODEL]["config"]["model_filename"] == ["model.pt"]  # MONAI Label offers every models/*.pt


def test_inference_segments_a_volume(server, tmp_path):
    out = tmp_path / "pred.nii.gz"
    out.write_bytes(server.infer(server.test_case))
    image, pred = nib.load(server.images[server.test_case]), nib.load(out)
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def _train(server: Server, meta_cases: str) -> tuple[dict, str]:
    """Run one training epoch through the REST API and wait for it to end; return the task's status and the
    server log written meanwhile."""
    start = server.log.stat().st_size
    request = {"max_epochs": 1, "val_split": 0.2, "multi_gpu": False, "meta_cases": meta_cases}
    server.json("POST", f"/train/{MODEL}", request)
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        task = server.json("GET", "/train/")
        if task["status"] in ("DONE", "ERROR"):
            return task, server.log_since(start)
        time.sleep(2)
    server.call("DELETE", "/train/")
    pytest.fail(f"training did not finish within {TRAIN_TIMEOUT_S} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def labelled(server) -> Server:
    """The server after an annotator submitted final labels for every case but the test case."""
    for case, label in server.labels.items():
        body, content_type = _multipart("label", label)
        server.call("PUT", f"/datastore/label?image={case}&tag=final", body, content_type)
    datastore = server.json("GET", "/datastore/?output=all")
    assert sorted(case for case, obj in datastore["objects"].items() if "final" in obj["labels"]) == sorted(server.labels)
    return server


def test_training_round_on_submitted_labels_updates_the_model(labelled):
    model = labelled.bundle / "models" / "model.pt"
    shipped = _md5(model)
    labelled.infer(labelled.test_case)  # the served network is now cached
    task, log = _train(labelled, meta_cases=labelled.meta_case)
    assert task["status"] == "DONE", log[-5000:]
    assert re.search(r"Metrics -- .*\bmeta_loss: \d", log), "no meta step ran on the named meta case"
    assert _md5(model) != shipped, "training did not rewrite models/model.pt"
    assert [p.name for p in model.parent.iterdir()] == ["model.pt"], "checkpoints belong in checkpoints/"
    start = labelled.log.stat().st_size
    labelled.infer(labelled.test_case)
    assert "Reload model" in labelled.log_since(start), "inference did not pick up the new model.pt"


def test_training_fails_when_no_labelled_case_is_named_meta(labelled):
    task, log = _train(labelled, meta_cases=labelled.test_case)  # an image without a label
    assert task["status"] == "ERROR"
    assert "num_samples=0" in log  # the empty meta loader (docs/monailabel.md)
