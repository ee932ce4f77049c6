"""Where the testbed's commands write their results: ``<stem>.json`` and ``<stem>.md``."""
from __future__ import annotations

import json
import os


def write_result(out: str, stem: str, result: dict, table: str) -> str:
    """``<stem>.json`` (the result) and ``<stem>.md`` (its table) in ``out``; returns the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(table)
    return table
