"""The README's config reference is generated from the schema and must match it."""

from __future__ import annotations

import re
from pathlib import Path

from trecsys.config import all_keys
from trecsys.config.reference import BEGIN, END, reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_matches_the_schema():
    text = README.read_text(encoding="utf-8")
    block = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert block == reference(), "run: python -m trecsys.config.reference --write README.md"


def test_every_key_is_documented():
    table = reference()
    for key in all_keys():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
        meaning = re.split(r"(?<!\\)\|", row)[-2].strip()  # last cell; type cells escape their pipes
        assert meaning, f"config key {key} has no comment in trecsys/config/schema.py"
