"""Model-zoo packaging and export: the release zip (the bundle's runtime code with everything it imports, the
model card and the docs it links), its download and load through MONAI from a local server, ``large_files.yml``
hashes, and ONNX / TorchScript exports that agree with the checkpoint."""

from __future__ import annotations

import ast
import hashlib
import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from monai.bundle import ConfigParser, download_large_files, load
from monai.networks.nets import UNet

from tests.conftest import BUNDLE_ROOT
from tools.package import BUNDLE_NAME, package_bundle

CONFIGS = BUNDLE_ROOT / "configs"
MODEL = BUNDLE_ROOT / "models" / "model.pt"
VERSION = json.loads((CONFIGS / "metadata.json").read_text())["version"]
ZIP_NAME = f"{BUNDLE_NAME}_v{VERSION}.zip"
EXCLUDED = {".venv", ".git", "data", "runs", "eval", "tests", "__pycache__"}
TIMEOUT_S = 120


def run_module(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` without PYTHONPATH, bounded in time, with loopback traffic kept off any proxy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
    command = [sys.executable, "-m", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the tail of the output unless the command succeeded."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def checkpoint_network() -> torch.nn.Module:
    """The inference ``network_def`` with the shipped weights, in eval mode: the reference for the exports."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(MODEL, weights_only=True))
    return net.eval()


def export(command: str, filepath: Path, *args: str) -> None:
    """``python -m monai.bundle <command>`` of the inference ``network_def`` with the shipped weights."""
    meta, config = CONFIGS / "metadata.json", CONFIGS / "inference.json"
    common = ("network_def", "--filepath", filepath, "--ckpt_file", MODEL, "--meta_file", meta, "--config_file", config)
    check(run_module("monai.bundle", command, *common, *args, cwd=filepath.parent))


def download(url: str, bundle_dir: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle download`` of this bundle's name from ``url``."""
    args = ("download", "--name", BUNDLE_NAME, "--url", url, "--bundle_dir", bundle_dir, "--progress", "False")
    return run_module("monai.bundle", *args, cwd=bundle_dir)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The release zip of this bundle, made with the CLI as a maintainer would."""
    out = tmp_path_factory.mktemp("dist")
    result = check(run_module("tools.package", "--out_dir", out, cwd=BUNDLE_ROOT))
    assert result.stdout.strip() == str(out / ZIP_NAME)
    return out


@pytest.fixture(scope="module")
def server(dist) -> Iterator[str]:
    """Base URL of a stdlib HTTP server on 127.0.0.1 (a free port) serving ``dist``."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(dist))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``load`` applies the bundle's logging.conf to the root logger; restore it for the tests that follow."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def fake_bundle(tmp_path) -> Path:
    """A minimal bundle plus everything that must stay out of a release."""
    root = tmp_path / "bundle"
    files = {
        "LICENSE": "licence",
        "README.md": "readme",
        "docs/README.md": "docs",
        "scripts/__init__.py": "",
        "configs/inference.json": "{}",
        "configs/logging.conf": "",
        "models/model.pt": "weights",
        "configs/metadata.json": json.dumps({"version": "0.2.0", "changelog": {"0.2.0": "x"}}),
        "data/default/case.nii.gz": "",
        "runs/demo/log.txt": "",
        "eval/scores.csv": "",
        "tests/test_x.py": "",
        ".venv/bin/python": "",
        ".git/HEAD": "",
        "scripts/__pycache__/x.cpython-311.pyc": "",
        "models/checkpoint_final.pt": "optimizer state",
        "dist/old.zip": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    entry = {"path": "models/model.pt", "url": "", "hash_val": hashlib.md5(b"weights").hexdigest(), "hash_type": "md5"}
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    return root


@pytest.mark.parametrize("include_weights", [True, False])
def test_zip_holds_only_the_zoo_files(fake_bundle, tmp_path, include_weights):
    first = package_bundle(fake_bundle, tmp_path / "a", name="fake", include_weights=include_weights)
    second = package_bundle(fake_bundle, tmp_path / "b", name="fake", include_weights=include_weights)
    assert first.name == "fake_v0.2.0.zip"
    assert first.read_bytes() == second.read_bytes()  # reproducible, so a re-run gives the same release asset
    expected = ["LICENSE", "README.md", "configs/inference.json", "configs/logging.conf", "configs/metadata.json"]
    expected += ["docs/README.md", "large_files.yml", "scripts/__init__.py"]
    if include_weights:
        expected.append("models/model.pt")  # listed in large_files.yml, unlike the training checkpoint beside it
    assert zipfile.ZipFile(first).namelist() == [f"fake/{name}" for name in sorted(expected)]


def test_zip_of_this_bundle(dist):
    names = zipfile.ZipFile(dist / ZIP_NAME).namelist()
    assert names == sorted(names)
    assert {name.split("/")[0] for name in names} == {BUNDLE_NAME}
    files = {name.split("/", 1)[1] for name in names}
    zoo_files = {"LICENSE", "README.md", "large_files.yml", "models/model.pt", "models/meta_network.pt"}
    zoo_files |= {"configs/metadata.json", "configs/inference.json", "configs/logging.conf", "docs/README.md"}
    assert zoo_files <= files
    # the runtime code, not every scripts/*.py: the package, what the configs name and the audit command, with
    # what they import (the closure is checked by test_shipped_code_imports_only_shipped_code)
    runtime = {"scripts/__init__.py", "scripts/trainer.py", "scripts/meta_net.py", "scripts/losses.py"}
    assert runtime | {"scripts/audit.py", "scripts/utils.py"} <= files
    code = {name for name in files if name.endswith(".py")}
    # the default data's generator and the datalist converter ship; not scripts/lidc, experiments or tools
    assert {"scripts/data/__main__.py", "scripts/data/synthetic.py", "scripts/data/datalists.py"} <= code
    # the checks package whole: the configs name it, and the model card documents python -m scripts.checks
    assert {"scripts/checks/__init__.py", "scripts/checks/__main__.py", "scripts/checks/datalist.py"} <= code
    assert all(Path(name).parent in (Path("scripts"), Path("scripts/checks"), Path("scripts/data")) for name in code)
    # the model card, the docs it links and the figures they show; not tool docs it does not link
    assert {"docs/results.md", "docs/results_dice_vs_noise.png", "docs/results_weight_maps.png"} <= files
    assert {"docs/audit.md", "docs/real_data.md"} <= files  # real_data.md through audit.md's link
    # no top-level data, runs, environments or tests (scripts/data is the shipped data tools), no caches anywhere
    assert not any(EXCLUDED & {Path(name).parts[1]} or "__pycache__" in Path(name).parts for name in names)


def _bundle_imports(source: str, module: str) -> set[str]:
    """The ``scripts`` modules (or names in them) that ``source`` of ``module`` imports, anywhere in it."""
    package = module.rsplit(".", 1)[0] if not module.endswith("__init__") else module[: -len(".__init__")]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            names.add(node.module if not node.level else ".".join(filter(None, [base, node.module])))
    return {name for name in names if name.split(".")[0] == "scripts"}


def test_shipped_code_imports_only_shipped_code(dist):
    """Every scripts module the shipped configs name and every scripts import in the shipped code is shipped."""
    archive = zipfile.ZipFile(dist / ZIP_NAME)
    files = {name.split("/", 1)[1]: name for name in archive.namelist()}

    def shipped(dotted: str) -> bool:
        path = dotted.replace(".", "/")
        return f"{path}.py" in files or f"{path}/__init__.py" in files

    targets = set()
    for name in (n for n in files if n.startswith("configs/") and n.endswith(".json")):
        targets |= set(re.findall(r'"_target_": "\$?(scripts\.[\w.]+)"', archive.read(files[name]).decode()))
    assert "scripts.trainer.MCPMTrainer" in targets
    # a _target_ is module.attribute: its module is a shipped module
    assert all(shipped(target.rsplit(".", 1)[0]) for target in targets), sorted(targets)
    for name in (n for n in files if n.endswith(".py")):
        module = name[: -len(".py")].replace("/", ".")
        imported = _bundle_imports(archive.read(files[name]).decode(), module)
        assert all(shipped(m) or shipped(m.rsplit(".", 1)[0]) for m in imported), (name, sorted(imported))


def test_shipped_docs_are_the_model_card_and_what_it_links(dist):
    """Every doc and image a shipped doc links is shipped, and every shipped doc or image is linked by one."""
    archive = zipfile.ZipFile(dist / ZIP_NAME)
    docs = {name.split("/", 1)[1] for name in archive.namelist() if name.split("/")[1] == "docs"}
    linked = {"docs/README.md"}
    for doc in (name for name in docs if name.endswith(".md")):
        text = re.sub(r"```.*?```", "", archive.read(f"{BUNDLE_NAME}/{doc}").decode(), flags=re.S)
        targets = {t for t in re.findall(r"\]\(([^)#\s]+)", text) if not re.match(r"[a-z]+:", t)}
        linked |= {os.path.normpath(f"docs/{t}") for t in targets if t.endswith((".md", ".png"))}
    linked = {name for name in linked if name.startswith("docs/")}
    assert docs == linked, (sorted(docs - linked), sorted(linked - docs))


def test_shipped_modules_import_in_the_unzipped_bundle(dist, tmp_path):
    """Each shipped module imports from the unzipped folder alone (no repository on the path)."""
    zipfile.ZipFile(dist / ZIP_NAME).extractall(tmp_path)
    bundle = tmp_path / BUNDLE_NAME
    modules = sorted(f"scripts.{p.stem}" for p in (bundle / "scripts").glob("*.py") if p.stem != "__init__")
    code = f"import importlib, scripts; print(scripts.__file__); [importlib.import_module(m) for m in {modules!r}]"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", code]
    result = check(subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=TIMEOUT_S))
    assert Path(result.stdout.splitlines()[0]).resolve().is_relative_to(bundle.resolve())


def test_docs_follow_the_model_card_links(fake_bundle, tmp_path):
    """Only the docs the model card links, transitively, ship, with the images they show; code is no link."""
    docs = fake_bundle / "docs"
    (docs / "README.md").write_text("See [the method](method.md#options), [a site](https://example.org/x.md).\n")
    (docs / "method.md").write_text("![weights](figures/w.png)\n[back](README.md) [more](./more.md)\n")
    (docs / "more.md").write_text('<img src="plot.svg">\n`[not a link](tool.md)`\n```\n[nor this](tool.md)\n```\n')
    for name in ("tool.md", "figures/w.png", "plot.svg", "unshown.png"):
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text("")
    names = zipfile.ZipFile(package_bundle(fake_bundle, tmp_path, name="fake")).namelist()
    shipped_docs = sorted(name[len("fake/") :] for name in names if name.startswith("fake/docs/"))
    expected = ["README.md", "figures/w.png", "method.md", "more.md", "plot.svg"]
    assert shipped_docs == [f"docs/{name}" for name in expected]
    (docs / "more.md").write_text("[gone](gone.md) ![gone](gone.png)\n")
    with pytest.raises(ValueError, match="docs/more.md links gone.md.*docs/more.md shows gone.png"):
        package_bundle(fake_bundle, tmp_path, name="fake", overwrite=True)


def test_package_refuses_code_that_imports_unshipped_modules(fake_bundle, tmp_path):
    """A config or shipped module that needs a module outside the shipped folders (or a missing one) stops
    packaging."""
    target = {"trainer": {"_target_": "scripts.trainer.Trainer"}, "check": "$scripts.checks.run(@trainer)"}
    (fake_bundle / "configs" / "train.json").write_text(json.dumps(target))
    (fake_bundle / "scripts" / "trainer.py").write_text("from scripts import losses\nfrom .utils import helper\n")
    for name in ("losses", "utils", "checks", "unused"):
        (fake_bundle / "scripts" / f"{name}.py").write_text("")
    names = zipfile.ZipFile(package_bundle(fake_bundle, tmp_path / "ok", name="fake")).namelist()
    code = sorted(name[len("fake/") :] for name in names if name.endswith(".py"))
    assert code == [f"scripts/{name}.py" for name in ("__init__", "checks", "losses", "trainer", "utils")]
    (fake_bundle / "scripts" / "lidc").mkdir()
    (fake_bundle / "scripts" / "lidc" / "__init__.py").write_text("")
    (fake_bundle / "scripts" / "utils.py").write_text("def helper():\n    from scripts.lidc import generate\n")
    (fake_bundle / "scripts" / "checks.py").write_text("import scripts.missing\n")
    with pytest.raises(ValueError) as raised:
        package_bundle(fake_bundle, tmp_path / "bad", name="fake")
    assert "scripts/utils.py imports scripts.lidc, but scripts/lidc/__init__.py is not shipped" in str(raised.value)
    assert "scripts/checks.py imports scripts.missing, which does not exist" in str(raised.value)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_package_refuses_version_missing_from_changelog(fake_bundle, tmp_path):
    (fake_bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.3.0", "changelog": {}}))
    with pytest.raises(ValueError, match="0.3.0"):
        package_bundle(fake_bundle, tmp_path)


def test_package_refuses_stale_large_file_hashes(fake_bundle, tmp_path):
    (fake_bundle / "models" / "model.pt").write_text("retrained weights")
    with pytest.raises(ValueError, match="models/model.pt"):
        package_bundle(fake_bundle, tmp_path)
    assert package_bundle(fake_bundle, tmp_path, include_weights=False).is_file()


def test_package_refuses_to_overwrite(dist, fake_bundle, tmp_path):
    result = run_module("tools.package", "--out_dir", dist, "--no_weights", cwd=BUNDLE_ROOT)
    assert result.returncode != 0 and f"{dist / ZIP_NAME} already exists" in result.stderr
    zip_path = package_bundle(fake_bundle, tmp_path)
    with pytest.raises(FileExistsError, match=zip_path.name):
        package_bundle(fake_bundle, tmp_path, include_weights=False)
    assert package_bundle(fake_bundle, tmp_path, include_weights=False, overwrite=True) == zip_path
    assert f"{BUNDLE_NAME}/models/model.pt" not in zipfile.ZipFile(zip_path).namelist()


def test_large_files_md5_match_the_shipped_weights():
    entries = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt", "models/meta_network.pt"]
    for entry in entries:
        assert entry["hash_type"] == "md5" and entry["url"].startswith("https://")
        assert hashlib.md5((BUNDLE_ROOT / entry["path"]).read_bytes()).hexdigest() == entry["hash_val"], entry["path"]


def test_download_and_load_from_local_server(server, tmp_path, root_logging):
    check(download(f"{server}/{ZIP_NAME}", tmp_path))
    downloaded = tmp_path / BUNDLE_NAME
    for path in ("models/model.pt", "models/meta_network.pt"):
        assert (downloaded / path).read_bytes() == (BUNDLE_ROOT / path).read_bytes()
    download_large_files(bundle_path=str(downloaded))  # every listed file exists with its md5, so nothing is fetched
    # "inference", not "infer": load() reads configs/<workflow_type>.json and returns a bare state dict without it
    net = load(name=BUNDLE_NAME, bundle_dir=tmp_path, workflow_type="inference", device="cpu")
    assert isinstance(net, UNet)
    shipped, loaded = torch.load(MODEL, weights_only=True), net.state_dict()
    assert loaded.keys() == shipped.keys() and all(torch.equal(loaded[k], shipped[k]) for k in shipped)
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_download_from_wrong_url_fails(server, tmp_path):
    result = download(f"{server}/missing_v{VERSION}.zip", tmp_path)
    assert result.returncode != 0
    assert "HTTP Error 404" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / BUNDLE_NAME).exists()


def test_onnx_export_matches_pytorch(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    export("onnx_export", onnx_file, "--input_shape", "[1,1,48,48,48]")
    image = torch.rand(1, 1, 48, 48, 48)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (onnx_pred,) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.no_grad():
        expected = checkpoint_network()(image).numpy()
    assert np.abs(onnx_pred - expected).max() < 1e-3


def test_torchscript_export_matches_checkpoint(tmp_path):
    ts_file = tmp_path / "model.ts"
    export("ckpt_export", ts_file)
    module = torch.jit.load(str(ts_file))
    assert not module.training  # exported ready for inference: batch norm uses the running statistics
    image = torch.rand(1, 1, 48, 48, 48)
    with torch.no_grad():
        assert (module(image) - checkpoint_network()(image)).abs().max() < 1e-4
