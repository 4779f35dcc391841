"""The "numerics (emulated)" column of docs/ascend-ops.md: per contract and chip, how its parity
cases fared when the ascend backend ran on the vendor-op emulator (`v4hal parity --backend ascend
--emulate A2 --out DIR` writes DIR/parity.json; one file per chip). The dry run's `--report`
reads them with `--numerics`: numbers need the emulator, shapes need only the Meta kernels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

EMULATED_LABEL = re.compile(r"^ascend \(emulated (A\d)\)$")
NOTE_CHARS = 80


class NumericsError(ValueError):
    """A parity file that is not an emulated ascend run."""


def load(paths: list[Path]) -> dict[str, list[dict]]:
    """Chip -> its parity rows, from emulated ascend parity JSON files (one chip per file; several
    files of one chip, e.g. `--quick` and `--select moe_`, merge, a later row of a case winning)."""
    by_case: dict[str, dict[str, dict]] = {}
    for path in paths:
        rows = json.loads(Path(path).read_text())["rows"]
        chips = {m.group(1) if (m := EMULATED_LABEL.match(r["backend"])) else None for r in rows}
        if len(chips) != 1 or None in chips:
            raise NumericsError(f"{path}: expected the rows of one emulated ascend chip "
                                f"('ascend (emulated A3)'), got backends {sorted({r['backend'] for r in rows})}")
        by_case.setdefault(chips.pop(), {}).update((r["case"], r) for r in rows)
    return {chip: list(rows.values()) for chip, rows in by_case.items()}


def _chip_part(rows: list[dict]) -> str:
    if not rows:
        return "not run"
    failed = [r for r in rows if r["status"] == "fail"]
    unavailable = [r for r in rows if r["status"] == "unavailable"]
    if unavailable and len(unavailable) == len(rows):
        return f"no ascend implementation ({unavailable[0]['note'][:NOTE_CHARS]})"
    passed = sum(r["status"] == "pass" for r in rows)
    text = f"pass {passed}/{len(rows)}"
    if failed:
        text += " **FAILS** " + ", ".join(f"{r['case'].split('/', 1)[1]} ({r['note'][:NOTE_CHARS]})" for r in failed)
    return text


def cell(by_chip: dict[str, list[dict]], op: str, chips: list[str], total: dict[str, int]) -> str:
    """One contract's numerics across chips, e.g. `A2: pass 12/12; A3: pass 11/12 (1 not run)`;
    `total` is the number of parity cases of each contract (cases not in a file count as not run)."""
    parts = []
    for chip in chips:
        rows = [r for r in by_chip.get(chip, []) if r["op"] == op]
        part = _chip_part(rows)
        missing = total.get(op, 0) - len(rows)
        if rows and missing > 0:
            part += f" ({missing} not run)"
        parts.append(f"{chip}: {part}")
    return "; ".join(parts)
