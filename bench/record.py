"""Where benches record what they measured: ``bench/results/<bench>.json``.

Format (shared by every bench; ``scripts/gen_measured.py`` turns the files into the README's
"Measured" tables)::

    {"bench": str, "measured_at": ISO-8601 UTC, "rows": [
        {"what": str, "ours": str, "baseline": str, "ratio": float | null}]}

A smoke run (tests) must not overwrite the recorded figures: it passes ``--smoke``, and the bench
then writes only when ``BENCH_RESULTS_DIR`` points somewhere (the smoke test's temporary folder).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def row(what: str, ours: str, baseline: str, ratio: float | None) -> dict[str, Any]:
    return {
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "ratio": None if ratio is None else round(ratio, 2),
    }


def write(bench: str, rows: list[dict[str, Any]], *, smoke: bool) -> Path | None:
    """Record ``rows``; returns the file written, or None for a smoke run with nowhere to write."""
    target = os.environ.get("BENCH_RESULTS_DIR")
    if smoke and not target:
        return None
    folder = Path(target) if target else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bench}.json"
    doc = {
        "bench": bench,
        "measured_at": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"recorded {path}")
    return path
