"""Serve the bundle with MONAI Label: prepare the app from the bundle as it is, then start the server offline.

    bash run.sh serve --studies DIR [--port 8000] [--host 127.0.0.1]

The app is ``apps/mcpm_review/`` (``--app_dir``): the app module of ``monailabel_app/`` and, in
``model/mcpm_segmentation/``, a copy of the bundle's ``LICENSE``, ``configs/`` and ``scripts/`` with
``configs/train.json`` merged with the MONAI Label override ``configs/train_monailabel.json`` (the one training config
MONAI Label reads). Preparing again picks up a changed config or script; the weights a round trained
(``models/model.pt``, ``models/meta/meta_network.pt``) are never replaced: the shipped ones are copied only where
the app has none. The server runs with ``.venv-monailabel`` (docs/monailabel.md), on 127.0.0.1 unless ``--host`` says
otherwise, and needs no network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_SOURCE = REPO_ROOT / "monailabel_app"
MODEL = "mcpm_segmentation"  # monailabel_app/mcpm_common.py names the bundle folder so too
BUNDLE_FILES = ("LICENSE", "configs", "scripts")
# shipped weights -> where the app keeps them; copied only where the app has none
WEIGHTS = {"models/model.pt": "models/model.pt", "models/meta_network.pt": "models/meta/meta_network.pt"}
TRAIN_CONFIGS = ("configs/train.json", "configs/train_monailabel.json")


def prepare_app(app_dir: Path, bundle_root: Path = REPO_ROOT, overrides: dict[str, Any] | None = None) -> Path:
    """Write (or refresh) the app in ``app_dir`` from the bundle at ``bundle_root``, with ``overrides`` (config keys,
    ``#``-separated) set in its training config; returns the bundle copy."""
    from monai.bundle import ConfigParser

    # the merged config first, so that a wrong key fails before anything in the app changes
    merged = ConfigParser(ConfigParser.load_config_files([str(bundle_root / c) for c in TRAIN_CONFIGS]))
    for key, value in (overrides or {}).items():
        if key not in merged:
            raise KeyError(f"--override {key}: the training config has no such key.")
        merged[key] = value
    app_dir.mkdir(parents=True, exist_ok=True)
    for module in sorted(APP_SOURCE.glob("*.py")):
        shutil.copyfile(module, app_dir / module.name)
    bundle = app_dir / "model" / MODEL
    for name in BUNDLE_FILES:
        source, target = bundle_root / name, bundle / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    ConfigParser.export_config_file(merged.get(), str(bundle / "configs" / "train.json"), indent=4)
    for shipped, kept in WEIGHTS.items():
        target = bundle / kept
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle_root / shipped, target)
    return bundle


def server_command(
    app_dir: Path, studies: Path, host: str, port: int, conf: Sequence[Sequence[str]] = ()
) -> list[str]:
    """``monailabel start_server`` with this interpreter (not the ``monailabel`` script, which runs whichever
    ``python`` is first on ``PATH``), and the app's ``--conf KEY VALUE`` settings."""
    confs = [item for key, value in conf for item in ("--conf", key, value)]
    return [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
        "--host", host, "--port", str(port), *confs,
    ]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``bash run.sh serve``: 127.0.0.1 unless ``--host`` says otherwise."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=Path, required=True, help="folder of the images (<id>.nii.gz, ...)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines")
    parser.add_argument("--app_dir", type=Path, default=REPO_ROOT / "apps" / "mcpm_review")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE",
        help="a value of the app's training config, VALUE as JSON, e.g. mcpm#warmup_epochs=0 or patch_size=[32,32,32]; "
        "repeatable (a round's epochs are the training request's max_epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
        help="a setting of the app, passed to the server, e.g. --conf mcpm_ranking score; repeatable",
    )  # fmt: skip
    parser.add_argument("--prepare_only", action="store_true", help="prepare the app, do not start the server")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: check the arguments, prepare the app, then replace this process with the server."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.studies.is_dir():
        parser.error(f"--studies {args.studies} is not a folder of images.")
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--override {item}: VALUE must be JSON (a string in double quotes).")
    try:
        import monailabel  # noqa: F401
    except ImportError:
        parser.error(f"{sys.executable} has no monailabel: run `bash run.sh serve`, which uses .venv-monailabel.")
    try:
        bundle = prepare_app(args.app_dir.absolute(), overrides=overrides)
    except KeyError as error:
        parser.error(str(error.args[0]))
    print(f"app ready: {args.app_dir} (bundle {bundle})", flush=True)
    if not args.prepare_only:
        command = server_command(args.app_dir.absolute(), args.studies.absolute(), args.host, args.port, args.conf)
        os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
