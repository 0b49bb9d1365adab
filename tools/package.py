"""Package the bundle as a model-zoo zip: ``<name>_v<version>.zip`` holding the single folder ``<name>/``.

Only the files a zoo bundle ships go in (licence, readme, configs, scripts, docs, ``large_files.yml`` and the
weights it lists), so local data, training runs, intermediate checkpoints, tests and environments never reach a
release. The archive is reproducible: sorted entries with a fixed timestamp and permissions.

    python -m tools.package --out_dir dist [--no_weights] [--overwrite]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path

import yaml

BUNDLE_NAME = "mcpm_noisy_label_segmentation"
REQUIRED_FILES = ("LICENSE", "README.md", "large_files.yml", "configs/metadata.json", "configs/inference.json")
PATTERNS = ("configs/*.json", "configs/logging.conf", "scripts/*.py", "docs/*.md")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp; fixed so that equal bundles give equal archives


def bundle_version(bundle_root: str | Path) -> str:
    """The metadata ``version``, which the zoo CI requires to have a ``changelog`` entry."""
    meta = json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())
    version = meta["version"]
    if version not in meta.get("changelog", {}):
        raise ValueError(f"version {version!r} in configs/metadata.json has no entry in its changelog.")
    return version


def weight_files(bundle_root: str | Path) -> list[str]:
    """Paths listed in ``large_files.yml``, checked against the local files so that its hashes cannot go stale.

    ``download_large_files`` raises on an existing file whose hash differs, so a stale entry would break the bundle.
    """
    root = Path(bundle_root)
    entries = yaml.safe_load((root / "large_files.yml").read_text())["large_files"]
    stale = [e["path"] for e in entries if file_hash(root / e["path"], e["hash_type"]) != e["hash_val"]]
    if stale:
        raise ValueError(f"large_files.yml hashes do not match {stale}; update them before packaging.")
    return [entry["path"] for entry in entries]


def file_hash(path: Path, hash_type: str) -> str:
    """Hex digest of ``path`` (``""`` when it is missing, which never matches a recorded hash)."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, hash_type).hexdigest()


def bundle_files(bundle_root: str | Path, include_weights: bool = True) -> list[str]:
    """Sorted bundle-relative POSIX paths of the files to ship."""
    root = Path(bundle_root)
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {root} lacks {missing}.")
    files = set(REQUIRED_FILES)
    files.update(path.relative_to(root).as_posix() for pattern in PATTERNS for path in root.glob(pattern))
    if include_weights:
        files.update(weight_files(root))
    return sorted(files)


def package_bundle(
    bundle_root: str | Path,
    out_dir: str | Path,
    name: str = BUNDLE_NAME,
    include_weights: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``<out_dir>/<name>_v<version>.zip`` and return its path."""
    root = Path(bundle_root)
    zip_path = Path(out_dir) / f"{name}_v{bundle_version(root)}.zip"
    if zip_path.exists() and not overwrite:
        raise FileExistsError(f"{zip_path} already exists; pass overwrite=True (--overwrite) to replace it.")
    files = bundle_files(root, include_weights)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_name(zip_path.name + ".part")  # never leave a half-written zip under the final name
    with zipfile.ZipFile(partial, "w") as archive:
        for relative in files:
            info = zipfile.ZipInfo(f"{name}/{relative}", date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, (root / relative).read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    return partial.replace(zip_path)


def main() -> None:
    """Package the bundle that holds this script and print the zip's path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="dist", help="folder for the zip (default: dist)")
    parser.add_argument("--no_weights", action="store_true", help="leave the weights out (see large_files.yml)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing zip of the same version")
    args = parser.parse_args()
    bundle_root = Path(__file__).resolve().parents[1]
    try:
        print(package_bundle(bundle_root, args.out_dir, include_weights=not args.no_weights, overwrite=args.overwrite))
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
