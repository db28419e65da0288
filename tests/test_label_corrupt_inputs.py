"""The labeling job on corrupted inputs among good ones (a real `python -m jobs.label` process,
real SmolLM2, embed-only so no heads are trained): a lone surrogate, a BOM and a broken CSV quote
no longer abort the job; good rows are labeled, bad ones quarantined with their reasons, and the
manifest reports the label-like fields that no adapter read, with one warning line per source."""

from __future__ import annotations

import json

import pytest
from label_fixtures import label_config, manifest, read_output, run_module, write_yaml

pytestmark = pytest.mark.slow

BOM = b"\xef\xbb\xbf"


def test_corrupted_inputs_are_quarantined_and_unused_labels_reported(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    # The 3-row file: it used to raise in the read task and end the job with exit 1.
    (d / "surrogate.jsonl").write_text(
        '{"prompt": "s0", "response": "r0"}\n{"prompt": "s1 \\ud800", "response": "r1"}\n'
        '{"prompt": "s2", "response": "r2"}\n'
    )
    (d / "bom.jsonl").write_bytes(BOM + b'{"prompt": "b0", "response": "r0"}\n{"prompt": "b1", "response": "r1"}\n')
    (d / "quote.csv").write_text('prompt,response\nc0,r0\n"c1,r1\nc2,r2\n')
    rated = tmp_path / "rated.jsonl"  # an instruction set whose reward column no adapter reads
    rated.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "response": f"a{i}", "reward_gpt4": 0.1 * i, "lang": "en"}) + "\n"
            for i in range(3)
        )
    )
    inputs = [{"path": str(d), "source": "mixed"}, {"path": str(rated), "source": "rated"}]
    cfg = label_config(tmp_path, None, inputs=inputs, limit_rows_per_input=None)
    proc = run_module("jobs.label", "--config", str(write_yaml(tmp_path / "job.yaml", cfg)))

    run_dir = tmp_path / "labels" / "t1"
    data, quarantined = read_output(run_dir), read_output(run_dir, "quarantine")
    by_source = {}
    for src in data.column("source").to_pylist():
        by_source[src] = by_source.get(src, 0) + 1
    assert by_source == {"mixed": 2 + 2 + 2, "rated": 3}
    reasons = sorted(quarantined.column("quarantine_reason").to_pylist())
    assert reasons == [
        "malformed CSV on line 3: unexpected end of data (broken quoting)",
        'unencodable text: prompt message 0 holds a lone surrogate U+D800 (a "\\ud800" escape '
        "without its pair), which is not valid Unicode",
    ]
    assert set(quarantined.column("stage").to_pylist()) == {"read"}
    man = manifest(run_dir)["sources"]
    mixed, rated_s = man["mixed"], man["rated"]
    assert (mixed["rows_in"], mixed["rows_labeled"], mixed["rows_quarantined"]) == (8, 6, 2)
    assert (rated_s["rows_in"], rated_s["rows_labeled"], rated_s["rows_quarantined"]) == (3, 3, 0)
    assert mixed["unused_fields"] == [] and mixed["unused_label_fields"] == []
    assert rated_s["unused_fields"] == ["lang", "reward_gpt4"] and rated_s["unused_label_fields"] == ["reward_gpt4"]
    warnings = [line for line in proc.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "'rated'" in warnings[0] and "reward_gpt4" in warnings[0]
