"""docs/config.md documents every key of every config kind, and only those: read from its tables
and compared with the keys each schema accepts (pipeline/config_schema.py), so the reference and
the code cannot drift. A table is marked `<!-- schema: KIND | PREFIX: SECTION ... -->`; a
reference `P[]: S` means each item of list P has section S's keys, `P: S` that mapping P has them."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from label_fixtures import REPO

DOC = REPO / "docs" / "config.md"
MARKER = re.compile(r"^<!-- schema: (.+?) -->$")
ROW = re.compile(r"^\| `([^`]+)` \|")


def doc_tables() -> dict[str, tuple[list[str], list[tuple[str, str]]]]:
    """Section name -> (the keys in its table, in order, duplicates kept; its references)."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    out: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        name, *refs = [part.strip() for part in m.group(1).split("|")]
        assert name not in out, f"section {name} marked twice"
        keys = []
        for row in lines[i + 1 :]:
            if not row.startswith("|"):
                break
            if k := ROW.match(row):
                keys.append(k.group(1))
        out[name] = (keys, [tuple(r.split(": ")) for r in refs])  # type: ignore[misc]
    return out


def documented(section: str, tables) -> list[str]:
    keys, refs = tables[section]
    out = list(keys)
    for prefix, target in refs:
        if not prefix.endswith("[]") and prefix in out:
            out.remove(prefix)  # a mapping section's own row: its keys are the target's
        out += [f"{prefix}.{k}" for k in documented(target, tables)]
    return out


def schemas():
    from jobs.schedule import SCHEMA as SCHEDULE
    from pipeline.curation.config import SCHEMA as CURATION
    from pipeline.labeling.config import SCHEMA as LABELING
    from pipeline.training import SCHEMA as TRAINING

    return {s.kind: s for s in (LABELING, TRAINING, CURATION, SCHEDULE)}


@pytest.mark.parametrize("kind", ["labeling", "training", "curation", "schedule"])
def test_documented_keys_are_the_schema_keys(kind):
    tables = doc_tables()
    keys = documented(kind, tables)
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    assert repeated == [], f"documented more than once: {repeated}"
    schema_keys = schemas()[kind].keys()
    assert sorted(set(keys) - set(schema_keys)) == [], "documented but not accepted"
    assert sorted(set(schema_keys) - set(keys)) == [], "accepted but not documented in docs/config.md"


def test_every_table_row_is_one_key_and_every_section_is_used():
    tables = doc_tables()
    used = {target for _, refs in tables.values() for _, target in refs}
    assert set(tables) == {"labeling", "training", "curation", "schedule"} | used
    for name, (keys, _) in tables.items():
        assert len(keys) == len(set(keys)) and keys, name


def test_readme_links_the_reference():
    assert "(docs/config.md)" in (REPO / "README.md").read_text(encoding="utf-8")
