"""One source per dataset split (issue 21 item 3): the shard files of a split, as hub downloads
and push_to_hub lay them out, default to one source named after the dataset and split."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pipeline.corpus import read_units
from pipeline.corpus.spec import dataset_source


@pytest.mark.parametrize(
    ("uri", "source"),
    [
        # push_to_hub / a hub download: <repo>/data/<split>-NNNNN-of-NNNNN.<ext>
        ("/dl/ultrafeedback_binarized/data/train_prefs-00000-of-00001.parquet", "ultrafeedback_binarized/train_prefs"),
        ("/dl/HelpSteer2/data/validation-00003-of-00010.parquet", "HelpSteer2/validation"),
        # a config folder instead of data/
        ("/dl/Nectar/default/train-00000-of-00002.jsonl.gz", "default/train"),
        ("s3://bucket/sets/shp/test-00000-of-00002.jsonl", "shp/test"),
        # hf:// paths: the revision suffix is not part of the name
        ("hf://datasets/PKU-Alignment/PKU-SafeRLHF@main/data/train-00001-of-00002.parquet", "PKU-SafeRLHF/train"),
        # the huggingface_hub cache: datasets--<org>--<name>/snapshots/<commit>/
        (
            "/home/u/.cache/huggingface/hub/datasets--nvidia--HelpSteer3/snapshots/3f2a/data/train-00000-of-00001.parquet",
            "HelpSteer3/train",
        ),
        # the Hub's parquet conversion: <config>/<split>/NNNN.parquet
        ("hf://datasets/org/arena@refs%2Fconvert%2Fparquet/default/train/0000.parquet", "arena/train"),
        ("/dl/helpsteer/preference/validation/0001.parquet", "helpsteer/preference/validation"),
        # anything else keeps its file name
        ("/dl/exports/2024/0001.jsonl", "0001"),
        ("/dl/day1.json", "day1"),
        ("/dl/train.jsonl", "train"),
        ("train-00000-of-00002.parquet", "train"),
    ],
)
def test_dataset_source(uri, source):
    assert dataset_source(uri) == source


def test_shard_files_of_one_split_read_as_one_source(tmp_path, shared_data):
    rows = json.loads((shared_data / "llmbar" / "LLMBar_Natural.json").read_text())[:9]
    data = tmp_path / "LLMBar" / "data"
    data.mkdir(parents=True)
    for i in range(3):
        name = f"train-{i:05d}-of-00003.jsonl"
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows[3 * i : 3 * i + 3]))
    (data / "test-00000-of-00001.jsonl").write_text(json.dumps(rows[0]) + "\n")
    spec = {"path": str(tmp_path / "LLMBar"), "format": "mapping"}
    spec["columns"] = {
        "prompt": "input",
        "responses": ["output_1", "output_2"],
        "label": {"column": "label", "values": {1: 0, 2: 1}},
    }
    t = read_units([spec])
    assert Counter(t.column("source").to_pylist()) == {"LLMBar/train": 18, "LLMBar/test": 2}
    # Each file still is its own shards (resume and exactly-once work per file).
    assert len(set(t.column("shard_id").to_pylist())) == 4
    assert Counter(t.column("preference").to_pylist()) == {"chosen": 10, "rejected": 10}
    # A spec's own source, or a hub preset's, still wins.
    spec["source"] = "llmbar-natural"
    assert set(read_units([spec]).column("source").to_pylist()) == {"llmbar-natural"}
