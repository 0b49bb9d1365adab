"""MONAI Label 0.8.5 serving the bundle through its own app (monailabel_app/), started by the one command
`bash run.sh serve`, offline on 127.0.0.1: inference, suspicion scoring of submitted labels with the shipped networks,
the review strategy that returns the deliberately dilated labels first, training rounds whose meta set is the
approved labels, and the errors of bad rounds.

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
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.corruption import morph_per_class
from scripts.data.synthetic import generate_dataset
from tests.conftest import BUNDLE_ROOT

VENV_PYTHON = BUNDLE_ROOT / ".venv-monailabel" / "bin" / "python"
# not the venv's `monailabel` script: that runs whichever `python` is first on PATH, with the venv's parent folder (here
# the bundle root) put on PYTHONPATH
MONAILABEL = [VENV_PYTHON, "-m", "monailabel.main"]
MODEL = "mcpm_segmentation"  # the app's bundle folder; MONAI Label takes the task type from the name
# Test-only values of the app's training config (`bash run.sh serve --override`): patches as large as the 32^3
# volumes, and meta steps from the first (only) epoch on.
TINY = {"patch_size": [32, 32, 32], "mcpm#warmup_epochs": 0}
DILATED = 2  # training labels dilated by 3 voxels: the suspect ones
START_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 180
HTTP_TIMEOUT_S = 60
# the server's web requests all go to a proxy on the closed discard port of this machine, so that anything it fetched
# from outside (the model zoo, SAM2 or other weights) would fail and show in its log: the one command must need none
PROXY = "http://127.0.0.1:9"
OFFLINE = {
    **{name: PROXY for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    "no_proxy": "127.0.0.1,localhost",
    "NO_PROXY": "127.0.0.1,localhost",
}
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
    studies: Path
    images: dict[str, Path]  # datastore image id -> original file
    labels: dict[str, Path]  # id -> label file of the cases that get one
    dilated: list[str]  # ids of the labels dilated on purpose
    meta_case: str  # a clean label, approved as trusted
    test_case: str  # an image without a label

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
    # smaller than the 32^3 patch along two axes, so that the maps are padded for the network and must come back
    generate_dataset(
        data, seed=5, num_training=5, num_meta=1, num_validation=1, num_test=1, shape=(28, 32, 30), corrupt_fraction=0.0
    )
    datalist = json.loads((data / "datalist.json").read_text())
    studies = tmp / "studies"
    studies.mkdir()
    cases = {split: {_case_id(e["image"]): e for e in datalist[split]} for split in ("training", "meta", "validation", "test")}
    images = {case: data / e["image"] for split in cases.values() for case, e in split.items()}
    labels = {case: data / e["label"] for split in ("training", "meta", "validation") for case, e in cases[split].items()}
    dilated = sorted(cases["training"])[:DILATED]
    for case in dilated:
        original = nib.load(labels[case])
        label = morph_per_class(np.asarray(original.dataobj), "dilate", 3).astype(np.uint8)
        labels[case] = tmp / f"{case}_dilated.nii.gz"
        nib.save(nib.Nifti1Image(label, original.affine), labels[case])
    for image in images.values():
        shutil.copy(image, studies)

    port = _free_port()
    log = tmp / "server.log"
    overrides = [item for key, value in TINY.items() for item in ("--override", f"{key}={json.dumps(value)}")]
    command = [
        "bash", BUNDLE_ROOT / "run.sh", "serve", "--studies", studies, "--port", str(port), "--app_dir", tmp / "app",
        *overrides,
    ]  # fmt: skip
    # scoring only when a test asks: by default MONAI Label also starts it in the background after every round and
    # every "next sample", which would race with the checks
    env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", **OFFLINE}
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True, env=env
        )
    result = Server(
        f"http://127.0.0.1:{port}", tmp / "app" / "model" / MODEL, log, studies, images, labels, dilated,
        next(iter(cases["meta"])), next(iter(cases["test"])),
    )  # fmt: skip
    try:
        _wait_until_up(result, process)
        yield result
    finally:
        _stop(process)


def test_the_one_command_serves_offline_on_localhost(server):
    """``bash run.sh serve`` without ``--host`` listens on 127.0.0.1 only, and started without a request leaving the
    machine (each would have met the closed proxy port of ``OFFLINE``)."""
    log = server.log.read_text()
    port = server.url.rsplit(":", 1)[1]
    assert f"Uvicorn running on http://127.0.0.1:{port}" in log
    assert not re.search(r"127\.0\.0\.1:9\b|ProxyError|Connection refused|Max retries exceeded", log)


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


def _train(server: Server, **options: object) -> tuple[dict, str]:
    """Run one training epoch through the REST API and wait for it to end; return the task's status and the
    server log written meanwhile."""
    start = server.log.stat().st_size
    request = {"max_epochs": 1, "val_split": 0.2, "multi_gpu": False, **options}
    server.json("POST", f"/train/{MODEL}", request)
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        task = server.json("GET", "/train/")
        if task["status"] in ("DONE", "ERROR"):
            return task, server.log_since(start)
        time.sleep(2)
    server.call("DELETE", "/train/")
    pytest.fail(f"training did not finish within {TRAIN_TIMEOUT_S} s:\n{server.log_tail()}")


def _submit(server: Server, case: str, label: Path) -> None:
    body, content_type = _multipart("label", label)
    server.call("PUT", f"/datastore/label?image={case}&tag=final", body, content_type)


def _review(server: Server, case: str, status: str, as_reviewer: bool = False) -> None:
    """Store a verdict on a case's final label with all five keys MONAILabelReviewer writes: through the documented
    ``PUT /datastore/label/info`` (form field ``info``), or with ``as_reviewer`` through the call the reviewer's
    buttons make, ``PUT /datastore/updatelabelinfo`` (form field ``params``)."""
    meta = {"status": status, "approvedBy": "tester", "level": "", "comment": "", "editTime": int(time.time())}
    path, field = ("/datastore/updatelabelinfo", "params") if as_reviewer else ("/datastore/label/info", "info")
    form = urllib.parse.urlencode({field: json.dumps({"segmentationMeta": meta})}).encode()
    server.call("PUT", f"{path}?label={case}&tag=final", form, "application/x-www-form-urlencoded")


def _next_sample(server: Server) -> str | None:
    return server.json("POST", "/activelearning/mcpm_suspect", {"client_id": "tester"}).get("id")


@pytest.fixture(scope="module")
def labelled(server) -> Server:
    """The server after an annotator submitted final labels for every case but the test case."""
    for case, label in server.labels.items():
        _submit(server, case, label)
    datastore = server.json("GET", "/datastore/?output=all")
    assert sorted(case for case, obj in datastore["objects"].items() if "final" in obj["labels"]) == sorted(server.labels)
    return server


def test_a_round_without_an_approved_label_explains_that_mcpm_needs_one(labelled):
    task, log = _train(labelled)
    assert task["status"] == "ERROR"
    assert "no approved label among the 7 submitted: MCPM needs at least one trusted label" in log
    task, log = _train(labelled, meta_cases=labelled.test_case)  # an image without a label
    assert task["status"] == "ERROR" and f"meta_cases {[labelled.test_case]} name no image" in log


@pytest.fixture(scope="module")
def approved(labelled) -> Server:
    """The server after a reviewer approved one clean label, the meta case, with MONAILabelReviewer's own call."""
    _review(labelled, labelled.meta_case, "approved", as_reviewer=True)
    return labelled


def _suspicion(server: Server) -> dict[str, dict]:
    objects = server.json("GET", "/datastore/?output=all")["objects"]
    return {case: objects[case]["image"]["info"].get("mcpm_suspicion", {}) for case in server.labels}


def test_scoring_ranks_the_dilated_labels_first_and_the_strategy_walks_them(approved):
    """With the shipped networks (no round has run yet): every submitted label gets a suspicion score, a region and
    a weight map on its image's grid; "next sample" returns the dilated labels first, skips a label once reviewed or
    approved, ignores the score of a label resubmitted since, and returns nothing when every label is reviewed."""
    result = approved.json("POST", "/scoring/mcpm_suspicion?run_sync=true", {})
    assert result["scored"] == len(approved.labels) and result["errors"] == {}
    assert sorted(result["ranking"][:DILATED]) == approved.dilated
    for case, suspicion in _suspicion(approved).items():
        assert 0 <= suspicion["score"] <= 1 and suspicion["region"]["voxels"] > 0
        weight, image = nib.load(suspicion["weight_map"]), nib.load(approved.images[case])
        low, high, centre = (np.array(suspicion["region"][key]) for key in ("min", "max", "centre"))
        assert (0 <= low).all() and (low <= high).all() and (high < image.shape).all()  # on the image's own grid
        box_centre = (image.affine @ np.append((low + high) / 2, 1.0))[:3]
        assert np.allclose(centre, box_centre, atol=1e-2)  # the box's centre in world coordinates
        assert {key: suspicion[key] for key in result["scores"][case]} == result["scores"][case]  # /scoring's answer
        assert weight.shape == image.shape and np.allclose(weight.affine, image.affine, atol=1e-4)
    assert approved.json("POST", "/scoring/mcpm_suspicion?run_sync=true", {}) == {
        "scored": 0, "unchanged": len(approved.labels)
    }  # fmt: skip

    first = _next_sample(approved)
    assert first in approved.dilated
    _review(approved, first, "flagged")
    second = _next_sample(approved)
    assert second in approved.dilated and second != first
    _submit(approved, first, approved.labels[first])  # resubmitted: unreviewed again, its score is of the old file
    assert _next_sample(approved) == second
    returned = []
    while (sample := _next_sample(approved)) is not None:
        assert sample not in returned and len(returned) < len(approved.labels)
        returned.append(sample)
        _review(approved, sample, "flagged")
    assert returned[0] == second and first in returned and approved.meta_case not in returned
    assert sorted(returned) == sorted(set(approved.labels) - {approved.meta_case})
    for case in returned:  # unreviewed again, for the rounds below
        _submit(approved, case, approved.labels[case])


def test_a_label_with_wrong_values_is_named_before_training_and_not_scored(approved, tmp_path):
    labelled = approved
    case = sorted(set(labelled.labels) - set(labelled.dilated) - {labelled.meta_case})[0]
    original = nib.load(labelled.labels[case])
    label = np.asarray(original.dataobj).copy()
    label[0, 0, 0] = 7
    bad = tmp_path / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(label, original.affine), bad)
    _submit(labelled, case, bad)
    task, log = _train(labelled)
    result = labelled.json("POST", "/scoring/mcpm_suspicion?run_sync=true", {})
    _submit(labelled, case, labelled.labels[case])
    assert task["status"] == "ERROR"
    assert re.search(rf"label \S*labels/final/{case}.nii.gz values \[7\] outside 0..2", log), log[-3000:]
    assert list(result["errors"]) == [case] and "values [7] outside 0..2" in result["errors"][case]
    assert result["scored"] == len(labelled.labels) - 1


def test_a_round_without_validation_cases_fails_instead_of_writing_no_model(approved):
    labelled = approved
    task, log = _train(labelled, val_split=0.0)
    assert task["status"] == "ERROR"
    assert "this round has 6 training and 0 validation cases" in log


def test_a_round_trains_with_the_approved_labels_as_meta_set_and_keeps_the_meta_network(approved):
    labelled = approved
    model = labelled.bundle / "models" / "model.pt"
    meta_network = labelled.bundle / "models" / "meta" / "meta_network.pt"
    before = {path: _md5(path) for path in (model, meta_network)}
    labelled.infer(labelled.test_case)  # the served network is now cached
    task, log = _train(labelled)
    assert task["status"] == "DONE", log[-5000:]
    assert re.search(r"Metrics -- .*\bmeta_loss: \d", log), "no meta step ran"
    rounds = json.loads((labelled.bundle / "checkpoints" / "monailabel_datalist.json").read_text())
    assert [_case_id(e["image"]) for e in rounds["meta"]] == [labelled.meta_case]
    assert labelled.meta_case not in {_case_id(e["image"]) for e in rounds["training"] + rounds["validation"]}
    assert f"the meta network starts from {meta_network}" in log
    assert all(_md5(path) != digest for path, digest in before.items()), "the round kept an old network"
    assert sorted(p.name for p in model.parent.glob("*.pt")) == ["model.pt"], "checkpoints belong in checkpoints/"
    start = labelled.log.stat().st_size
    labelled.infer(labelled.test_case)
    assert "Reload model" in labelled.log_since(start), "inference did not pick up the new model.pt"
    # the networks changed, so the scores are stale: scoring runs again, with this round's networks
    assert labelled.json("POST", "/scoring/mcpm_suspicion?run_sync=true", {})["scored"] == len(labelled.labels)
    assert f"scored {len(labelled.labels)} of {len(labelled.labels)} labels with the networks of {model.parent}" in (
        labelled.log_tail()
    )


def test_an_approved_label_whose_image_is_missing_is_named(approved, tmp_path):
    labelled = approved
    image = labelled.studies / labelled.images[labelled.meta_case].name
    moved = tmp_path / image.name
    shutil.move(image, moved)
    try:
        deadline = time.monotonic() + 30  # the datastore notices the removal through its file watcher
        while labelled.meta_case in labelled.json("GET", "/datastore/?output=all")["objects"]:
            assert time.monotonic() < deadline, "the datastore kept an image whose file is gone"
            time.sleep(1)
        task, log = _train(labelled)
    finally:
        shutil.move(moved, image)
    assert task["status"] == "ERROR"
    assert f"submitted labels without their image: {[str(labelled.studies / 'labels' / 'final' / image.name)]}" in log
