"""python -m jobs.inspect: the reader's view of a config's first rows, without Ray or a model."""

from __future__ import annotations

import json

import pytest
import yaml
from label_fixtures import REPO

from jobs.inspect import main


def _run(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().out


def test_demo_config_on_shared_data(capsys, monkeypatch, shared_data):
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repo root, as for the job
    rc, out = _run(capsys, "--config", "jobs/configs/demo.yaml", "--rows", "4", "--json")
    assert rc == 0
    oasst, llmbar = json.loads(out)
    # LLMBar: label 1 or 2 names the output that is chosen (shared/data README).
    raw = json.loads((shared_data / "llmbar" / "LLMBar_Natural.json").read_text())[:4]
    assert [f["file_format"] for f in llmbar["files"]] == ["json"]
    assert llmbar["files"][0]["adapters"] == {"llmbar": 4} and llmbar["sources"] == ["llmbar"]
    assert (llmbar["records_read"], llmbar["rows_ok"], llmbar["rows_quarantined"]) == (4, 4, 0)
    assert [(lab["chosen"], lab["rejected"]) for lab in llmbar["labels"]] == [
        (r["output_1"], r["output_2"]) if r["label"] == 1 else (r["output_2"], r["output_1"]) for r in raw
    ]
    assert list(llmbar["examples"]) == ["preference"] and llmbar["unused_fields"] == []
    # OASST: each tree gives a best-of-N row per prompter message with >= 2 ranked replies.
    assert oasst["records_read"] == 4 and oasst["rows_ok"] == len(oasst["labels"]) > 4
    assert all(sorted(lab["ranks"]) == lab["ranks"] and lab["ranks"][0] == 0 for lab in oasst["labels"])
    assert oasst["unused_label_fields"] == []  # nothing label-like left behind in the real trees


def _config(tmp_path, inputs) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_id": "x",
                "output": str(tmp_path / "out"),
                "inputs": inputs,
                "model": {"heads": str(tmp_path / "not-trained-yet")},
            }
        )
    )
    return str(path)


def test_tmp_inputs_labels_quarantine_and_unused_label_field(tmp_path, capsys):
    # Preference pairs in TRL's prompt/chosen/rejected columns, as CSV with a BOM, carrying a
    # rating column that nothing maps (Tulu-3 preference mixtures publish chosen_rating /
    # rejected_rating beside chosen / rejected), and one row with a broken quote.
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(
        b"\xef\xbb\xbfprompt,chosen,rejected,chosen_rating,source\n"
        b"q0,good0,bad0,5,x\n"
        b'"q1,good1,bad1,4,x\n'
        b"q2,good2,bad2,3,x\n"
    )
    # PandaLM test set layout (github.com/WeOpenML/PandaLM, data/testset-v1.json): annotator1..3
    # in {"0" tie, "1" response1 better, "2" response2 better}.
    panda = tmp_path / "panda.json"
    panda.write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "motivation_app": "m",
                    "cmp_key": "a_b",
                    "instruction": "i0",
                    "input": "",
                    "response1": "r1",
                    "response2": "r2",
                    "annotator1": "2",
                    "annotator2": "2",
                    "annotator3": "1",
                },
                {
                    "idx": 1,
                    "motivation_app": "m",
                    "cmp_key": "a_b",
                    "instruction": "i1",
                    "input": "",
                    "response1": "s1",
                    "response2": "s2",
                    "annotator1": "0",
                    "annotator2": "0",
                    "annotator3": "2",
                },
            ]
        )
    )
    cfg = _config(
        tmp_path,
        [{"path": str(pairs)}, {"path": str(panda), "format": "pandalm"}, {"path": str(tmp_path / "missing.jsonl")}],
    )
    rc, out = _run(capsys, "--config", cfg, "--json")
    assert rc == 1  # the missing input is reported, the others still inspected
    csv_r, panda_r, missing = json.loads(out)
    assert csv_r["files"][0]["file_format"] == "csv" and csv_r["files"][0]["adapters"] == {"preference": 2}
    assert [(lab["source_row"], lab["chosen"], lab["rejected"], lab["tie"]) for lab in csv_r["labels"]] == [
        (0, "good0", "bad0", False),
        (2, "good2", "bad2", False),
    ]
    assert csv_r["quarantine"] == {
        "malformed CSV": {
            "count": 1,
            "examples": [
                {
                    "source_row": 1,
                    "source_uri": str(pairs),
                    "reason": "malformed CSV on line 3: unexpected end of data (broken quoting)",
                }
            ],
        }
    }
    assert csv_r["unused_fields"] == ["chosen_rating", "source"] and csv_r["unused_label_fields"] == ["chosen_rating"]
    assert panda_r["labels"] == [
        {
            "source_row": 0,
            "kind": "preference",
            "tie": False,
            "label_confidence": pytest.approx(2 / 3),
            "chosen": "r2",
            "rejected": "r1",
        },
        {
            "source_row": 1,
            "kind": "preference",
            "tie": True,
            "label_confidence": pytest.approx(2 / 3),
            "responses": ["s1", "s2"],
        },
    ]
    assert panda_r["unused_fields"] == ["cmp_key", "idx", "motivation_app"] and panda_r["unused_label_fields"] == []
    assert "no input matches" in missing["error"]

    rc, text = _run(capsys, "--config", cfg, "--rows", "2")
    assert rc == 1
    assert "file " + str(pairs) + ": csv, adapter preference (1), 2 record(s)" in text
    assert 'row 0: chosen "good0" over rejected "bad0"' in text
    assert 'row 1: tie (confidence 0.667): "s1" = "s2"' in text
    assert "WARNING: fields that look like labels were never read: chosen_rating" in text
    assert text.count("WARNING") == 1


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: x\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err  # the whole config is checked: every missing key named
    assert "  - inputs: missing required key\n  - output: missing required key" in err
