import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"expected the shared data beside the repo at {SHARED_DATA}"
    return SHARED_DATA


from curation_fixtures import annotated_run, labeled_run  # noqa: E402,F401 - annotated runs

# Session fixtures shared by several modules live here, so each is built once per session
# (a fixture imported into a test module is a separate fixture of that module).
from label_fixtures import smollm2_heads  # noqa: E402,F401 - heads trained on real data
from ray_fixtures import multinode_cluster, ray_head  # noqa: E402,F401 - real Ray clusters (tests/ray_fixtures.py)
from s3_fixture import s3_server  # noqa: F401
