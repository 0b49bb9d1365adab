"""Tests of tools/lint.py's JSON check: the model zoo's `pretty-format-json --indent=4 --no-sort-keys` format."""

import json

from tools.lint import formatted_json, json_findings


def test_formatted_json_keeps_key_order_and_indents_lists_one_item_a_line():
    text = '{"b": 1, "a": ["x", "y"]}'
    assert formatted_json(text) == '{\n    "b": 1,\n    "a": [\n        "x",\n        "y"\n    ]\n}\n'
    assert formatted_json(formatted_json(text)) == formatted_json(text)


def test_json_findings_reports_unformatted_and_invalid_files_and_fix_rewrites_only_the_valid(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    good = configs / "good.json"
    good.write_text(formatted_json('{"a": 1}'))
    bad = configs / "bad.json"
    bad.write_text('{"z": [1, 2], "a": 1}')
    broken = configs / "broken.json"
    broken.write_text('{"a": 1,}')
    findings = json_findings(tmp_path)
    assert len(findings) == 2
    assert any(f.startswith("configs/bad.json: not formatted") for f in findings)
    assert any(f.startswith("configs/broken.json: not valid JSON") for f in findings)
    assert json_findings(tmp_path, fix=True) == [f for f in findings if "broken" in f]
    assert list(json.loads(bad.read_text())) == ["z", "a"] and bad.read_text() == formatted_json(bad.read_text())
    assert broken.read_text() == '{"a": 1,}'
    assert json_findings(tmp_path) == [f for f in findings if "broken" in f]
