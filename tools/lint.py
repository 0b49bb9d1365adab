"""Lint the repository with the MONAI model zoo's settings (``setup.cfg``): flake8, isort (black profile) and
the JSON format of the zoo's pre-commit hook ``pretty-format-json --indent=4 --no-sort-keys``.

    python -m tools.lint            # what `bash run.sh test` runs first; exit 1 on any finding
    python -m tools.lint --fix      # also rewrite the JSON files and sort the imports in place
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.utils import json_text, write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON_PATHS = ("scripts", "tests", "tools", "monailabel_app")
JSON_GLOBS = ("configs/*.json",)


def formatted_json(text: str) -> str:
    """``text`` as ``pretty-format-json --indent=4 --no-sort-keys`` writes it (:py:func:`scripts.utils.json_text`).
    Raises ValueError (json.JSONDecodeError) when ``text`` is not JSON."""
    return json_text(json.loads(text))


def json_findings(root: Path, fix: bool = False) -> list[str]:
    """The JSON files under ``root`` (:py:data:`JSON_GLOBS`) that are not formatted, or not JSON at all; with
    ``fix`` the formatted ones are rewritten in place (a file that is not JSON is only reported)."""
    findings = []
    for path in sorted(p for pattern in JSON_GLOBS for p in root.glob(pattern)):
        text = path.read_text()
        try:
            wanted = formatted_json(text)
        except ValueError as error:
            findings.append(f"{path.relative_to(root)}: not valid JSON: {error}")
            continue
        if text != wanted:
            if fix:
                write_text(wanted, path)
            else:
                findings.append(f"{path.relative_to(root)}: not formatted (run: python -m tools.lint --fix)")
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    """Run every check, print each finding and return 1 if there was any, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--fix", action="store_true", help="format the JSON files and sort the imports in place")
    args = parser.parse_args(argv)
    paths = [p for p in PYTHON_PATHS if (REPO_ROOT / p).exists()]
    isort = [sys.executable, "-m", "isort", *([] if args.fix else ["--check-only", "--diff"]), *paths]
    failed = False
    for name, command in (("isort", isort), ("flake8", [sys.executable, "-m", "flake8", *paths])):
        if subprocess.run(command, cwd=REPO_ROOT, check=False).returncode != 0:
            print(f"lint: {name} found problems (settings in setup.cfg)", file=sys.stderr)
            failed = True
    findings = json_findings(REPO_ROOT, fix=args.fix)
    for finding in findings:
        print(finding, file=sys.stderr)
    if failed or findings:
        return 1
    print(f"lint: clean ({', '.join(paths)}; {', '.join(JSON_GLOBS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
