"""Package the bundle as a model-zoo zip: ``<name>_v<version>.zip`` holding the single folder ``<name>/``.

Only what the bundle needs at run time and what its model card documents goes in, so local data, training runs,
intermediate checkpoints, tests, tools and environments never reach a release:

- ``LICENSE``, ``README.md``, ``large_files.yml`` and the weights it lists;
- ``configs/*.json`` and ``configs/logging.conf``;
- the runtime code: the modules of ``scripts/*.py`` and ``scripts/data/*.py`` that the configs name (``_target_``
  and ``$`` expressions) or that the model card documents as commands (``python -m scripts.audit``, the default
  data's generator ``python -m scripts.data``, ``python -m scripts.data.datalists``), and every ``scripts`` module
  those import, transitively; packaging fails when one of them imports a module that is not shipped
  (``scripts/lidc``, ``scripts/experiments``, ...) or does not exist;
- the model card ``docs/README.md``, the ``docs/*.md`` it links (transitively) and every image those show.

The archive is reproducible: sorted entries with a fixed timestamp and permissions.

    python -m tools.package --out_dir dist [--no_weights] [--overwrite]
"""

from __future__ import annotations

import argparse
import ast
import json
import posixpath
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from scripts.utils import atomic_path, file_hash

BUNDLE_NAME = "mcpm_noisy_label_segmentation"
REQUIRED_FILES = (
    "LICENSE",
    "README.md",
    "large_files.yml",
    "configs/metadata.json",
    "configs/inference.json",
    "docs/README.md",
)
CONFIG_PATTERNS = ("configs/*.json", "configs/logging.conf")
# the bundle's Python package; only the modules of these folders of it ship (the data tools make the default data)
PACKAGE = "scripts"
SHIPPED_FOLDERS = ("scripts", "scripts/checks", "scripts/data")
# commands the model card documents beside what the configs name; each ships (when present) with its imports
COMMAND_MODULES = ("scripts.audit", "scripts.checks.__main__", "scripts.data.__main__", "scripts.data.datalists")
MODEL_CARD = "docs/README.md"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp; fixed so that equal bundles give equal archives

# a reference to a bundle module in a config string: scripts.trainer.MCPMTrainer, $scripts.checks.f(...)
_REFERENCE = re.compile(rf"(?<![\w.]){PACKAGE}(?:\.[A-Za-z_]\w*)+")
# code that Markdown does not render as links: fenced blocks and inline code spans
_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$|`[^`\n]*`", re.S | re.M)
# [text](target "title") and ![alt](target); the text may hold one level of brackets
_LINK = re.compile(r"(!?)\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_HTML_IMAGE = re.compile(r"<img\s[^>]*?src\s*=\s*[\"']([^\"']+)[\"']", re.I)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # https:, mailto:, ...


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


def _strings(value: Any, key: str | None = None) -> Iterator[tuple[str | None, str]]:
    """Every string of a parsed JSON config, with the key it is the value of (None inside lists)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def config_references(bundle_root: str | Path) -> list[tuple[str, str]]:
    """``(config, reference)`` for every ``scripts.*`` name in a ``_target_`` or a ``$`` expression of the
    configs, e.g. ``("configs/train.json", "scripts.trainer.MCPMTrainer")``; descriptions are not references."""
    root = Path(bundle_root)
    references = []
    for path in sorted(root.glob("configs/*.json")):
        for key, text in _strings(json.loads(path.read_text())):
            if key == "_target_" or text.startswith("$"):
                references += [(path.relative_to(root).as_posix(), ref) for ref in _REFERENCE.findall(text)]
    return sorted(set(references))


def module_path(bundle_root: str | Path, dotted: str) -> str | None:
    """The bundle-relative file of the module ``dotted`` (``a/b.py`` or ``a/b/__init__.py``); None if absent."""
    base = "/".join(dotted.split("."))
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if (Path(bundle_root) / candidate).is_file():
            return candidate
    return None


def _resolve_reference(bundle_root: str | Path, reference: str) -> str | None:
    """The module a config reference such as ``scripts.trainer.MCPMTrainer`` lives in: its longest dotted prefix
    that is a module below the package (the package's ``__init__`` alone would hide a misspelt module)."""
    parts = reference.split(".")
    for size in range(len(parts), 1, -1):
        path = module_path(bundle_root, ".".join(parts[:size]))
        if path is not None:
            return path
    return None


def _imports(bundle_root: str | Path, relative: str) -> list[tuple[str, bool]]:
    """``(module, required)`` for every import of the bundle's package in ``relative``, at any depth (deferred
    imports inside functions count too). ``from a import b`` needs ``a``; ``a.b`` counts where it is a module."""
    tree = ast.parse((Path(bundle_root) / relative).read_text(), filename=relative)
    package = posixpath.dirname(relative).replace("/", ".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((module, True))
            found += [(f"{module}.{alias.name}", False) for alias in node.names if alias.name != "*"]
    return [(name, required) for name, required in found if name == PACKAGE or name.startswith(f"{PACKAGE}.")]


def _is_shipped_module(relative: str) -> bool:
    """Whether ``relative`` is a module of one of the :py:data:`SHIPPED_FOLDERS`, the only code that ships."""
    return posixpath.dirname(relative) in SHIPPED_FOLDERS and relative.endswith(".py")


def runtime_modules(bundle_root: str | Path) -> list[str]:
    """Sorted bundle-relative paths of the code to ship: ``scripts/__init__.py``, the modules the configs name,
    the :py:data:`COMMAND_MODULES`, and every ``scripts`` module these import, transitively.

    Raises:
        ValueError: listing every reference or import of a module that does not exist or would not ship (one
            outside ``scripts/*.py``), since the unzipped bundle would fail on it.
    """
    root = Path(bundle_root)
    problems = []
    queue: list[tuple[str, str]] = []
    init = module_path(root, PACKAGE)
    if init is not None:
        queue.append((init, "the package"))
    for config, reference in config_references(root):
        path = _resolve_reference(root, reference)
        if path is None:
            problems.append(f"{config} names {reference}, which is no module of the bundle")
        else:
            queue.append((path, f"{config} names {reference}"))
    for command in COMMAND_MODULES:
        path = module_path(root, command)
        if path is not None:
            queue.append((path, f"the command python -m {command}"))
    shipped: set[str] = set()
    while queue:
        path, reason = queue.pop(0)
        if path in shipped:
            continue
        if not _is_shipped_module(path):
            problems.append(f"{reason}, but {path} is not shipped (only {', '.join(f'{d}/*.py' for d in SHIPPED_FOLDERS)} is)")
            continue
        shipped.add(path)
        for module, required in _imports(root, path):
            target = module_path(root, module)
            if target is not None:
                queue.append((target, f"{path} imports {module}"))
            elif required:
                problems.append(f"{path} imports {module}, which does not exist")
    if problems:
        raise ValueError("the shipped code would not run: " + "; ".join(sorted(set(problems))) + ".")
    return sorted(shipped)


def _targets(text: str) -> Iterator[tuple[bool, str]]:
    """``(is_image, target)`` of every Markdown link and image, and every HTML ``<img>``, outside code."""
    text = _CODE.sub("", text)
    for match in _LINK.finditer(text):
        yield bool(match.group(1)), match.group(2)
    for match in _HTML_IMAGE.finditer(text):
        yield True, match.group(1)


def documentation(bundle_root: str | Path) -> list[str]:
    """Sorted bundle-relative paths of the docs to ship: the model card, every ``docs/**.md`` it links,
    transitively, and every image these docs show or link.

    Links to web pages, anchors and files outside the bundle are not followed; other files they link
    (configs, code) ship by their own rules.

    Raises:
        ValueError: listing every linked doc or image that does not exist, since the shipped docs would show a
            broken link.
    """
    root = Path(bundle_root)
    docs, images, problems = set(), set(), []
    queue = [MODEL_CARD]
    while queue:
        doc = queue.pop(0)
        if doc in docs:
            continue
        docs.add(doc)
        for is_image, target in _targets((root / doc).read_text()):
            target = unquote(target.split("#", 1)[0].split("?", 1)[0])
            if not target or target.startswith("/") or _SCHEME.match(target):
                continue
            linked = posixpath.normpath(posixpath.join(posixpath.dirname(doc), target))
            if linked == ".." or linked.startswith("../"):
                continue
            image = is_image or linked.lower().endswith(IMAGE_SUFFIXES)
            if not image and not (linked.startswith("docs/") and linked.endswith(".md")):
                continue
            if not (root / linked).is_file():
                problems.append(f"{doc} {'shows' if image else 'links'} {target}, which does not exist")
            elif image:
                images.add(linked)
            else:
                queue.append(linked)
    if problems:
        raise ValueError("the shipped docs would have broken links: " + "; ".join(sorted(set(problems))) + ".")
    return sorted(docs | images)


def bundle_files(bundle_root: str | Path, include_weights: bool = True) -> list[str]:
    """Sorted bundle-relative POSIX paths of the files to ship (see the module's docstring for the rules)."""
    root = Path(bundle_root)
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {root} lacks {missing}.")
    files = set(REQUIRED_FILES)
    files.update(path.relative_to(root).as_posix() for pattern in CONFIG_PATTERNS for path in root.glob(pattern))
    files.update(runtime_modules(root))
    files.update(documentation(root))
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
    # never a half-written zip under the final name
    with atomic_path(zip_path) as partial, zipfile.ZipFile(partial, "w") as archive:
        for relative in files:
            info = zipfile.ZipInfo(f"{name}/{relative}", date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            archive.writestr(info, (root / relative).read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    return zip_path


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
