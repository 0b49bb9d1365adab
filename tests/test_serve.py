"""`bash run.sh serve`'s preparation of the MONAI Label app (tools/serve.py), without a server: what it copies, that
preparing again picks up a changed config and keeps the weights a round trained, and its errors."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import BUNDLE_ROOT
from tools import serve


def test_prepares_the_app_and_keeps_trained_weights(tmp_path):
    app = tmp_path / "app"
    bundle = serve.prepare_app(app, overrides={"mcpm#warmup_epochs": 0})
    assert sorted(p.name for p in app.glob("*.py")) == sorted(p.name for p in serve.APP_SOURCE.glob("*.py"))
    assert (bundle / "scripts" / "trainer.py").is_file() and not list(bundle.rglob("__pycache__"))
    config = json.loads((bundle / "configs" / "train.json").read_text())
    assert config["mcpm"]["warmup_epochs"] == 0 and config["ckpt_dir"] == "$@bundle_root + '/checkpoints'"  # the override merged
    assert (bundle / "models" / "model.pt").read_bytes() == (BUNDLE_ROOT / "models" / "model.pt").read_bytes()
    shipped_meta = (BUNDLE_ROOT / "models" / "meta_network.pt").read_bytes()
    assert (bundle / "models" / "meta" / "meta_network.pt").read_bytes() == shipped_meta
    assert not (bundle / "models" / "meta_network.pt").exists()  # MONAI Label would offer it as a model

    # a round trained new weights; a changed script and config are picked up, the weights stay
    (bundle / "models" / "model.pt").write_bytes(b"trained")
    (bundle / "models" / "meta" / "meta_network.pt").write_bytes(b"trained meta")
    (bundle / "scripts" / "stale.py").write_text("")
    serve.prepare_app(app, overrides={"mcpm#warmup_epochs": 1})
    assert json.loads((bundle / "configs" / "train.json").read_text())["mcpm"]["warmup_epochs"] == 1
    assert not (bundle / "scripts" / "stale.py").exists()
    assert (bundle / "models" / "model.pt").read_bytes() == b"trained"
    assert (bundle / "models" / "meta" / "meta_network.pt").read_bytes() == b"trained meta"
    # a wrong key fails before anything in the app changes
    with pytest.raises(KeyError, match="mcpm#warmup_epoch"):
        serve.prepare_app(app, overrides={"mcpm#warmup_epoch": 0})
    assert json.loads((bundle / "configs" / "train.json").read_text())["mcpm"]["warmup_epochs"] == 1


def test_the_server_listens_on_localhost_unless_told(tmp_path):
    assert serve.build_parser().parse_args(["--studies", str(tmp_path)]).host == "127.0.0.1"
    assert serve.build_parser().parse_args(["--studies", str(tmp_path), "--host", "0.0.0.0"]).host == "0.0.0.0"
    command = serve.server_command(tmp_path / "app", tmp_path / "studies", "127.0.0.1", 8123, [["mcpm_ranking", "score"]])
    assert command[1:5] == ["-m", "monailabel.main", "start_server", "--app"]
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "8123"
    assert command[-3:] == ["--conf", "mcpm_ranking", "score"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--studies", "missing"], "is not a folder of images"),
        (["--studies", ".", "--override", "epochs=twenty"], "VALUE must be JSON"),
        (["--studies", ".", "--override", "epoch=20", "--prepare_only"], "the training config has no such key"),
    ],
)
def test_bad_arguments_are_named(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "monailabel", object())  # the check of the venv passes
    with pytest.raises(SystemExit):
        serve.main([*argv, "--app_dir", str(tmp_path / "app")])
    assert message in capsys.readouterr().err.splitlines()[-1]
