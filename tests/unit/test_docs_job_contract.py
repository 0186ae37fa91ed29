"""docs/workflow-builder.md's table of payment state → job status is the code's mapping."""

from __future__ import annotations

import re
from pathlib import Path

from connector.actions.outcome import JOB_STATUSES, SEND_STATUS

DOC = Path(__file__).resolve().parents[2] / "docs" / "workflow-builder.md"


def test_the_documented_mapping_is_the_code() -> None:
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| `([a-z_]+)` \|$", text, flags=re.M))
    assert rows == {state.value: status for state, status in SEND_STATUS.items()}


def test_every_job_status_is_documented() -> None:
    text = DOC.read_text()
    for status in JOB_STATUSES:
        assert f"`{status}`" in text
