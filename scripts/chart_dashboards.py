#!/usr/bin/env python3
"""Writes the Helm chart's fleet dashboard, charts/slm-monitoring/dashboards/fleet.json.

The JSON comes from `slm_operator.monitoring.dashboards.render_fleet_dashboard()`, the one place the
dashboard is written; the chart ships a copy because Helm can only read files inside the chart.

    .venv/bin/python scripts/chart_dashboards.py           # regenerate
    .venv/bin/python scripts/chart_dashboards.py --check   # exit 1 when the file is out of step
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FLEET_JSON = REPO_ROOT / "charts" / "slm-monitoring" / "dashboards" / "fleet.json"
GENERATOR = "scripts/chart_dashboards.py"


def render() -> str:
    # Imported here so `--help` works without the project installed.
    from slm_operator.monitoring.dashboards import render_fleet_dashboard

    return json.dumps(render_fleet_dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the chart's copy is out of step")
    args = parser.parse_args(argv)

    wanted = render()
    current = FLEET_JSON.read_text() if FLEET_JSON.exists() else ""
    if args.check:
        if current == wanted:
            print(f"{FLEET_JSON.relative_to(REPO_ROOT)} is in step")
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True), wanted.splitlines(keepends=True), "chart copy", "rendered"
        )
        sys.stderr.writelines(list(diff)[:60])
        print(f"{FLEET_JSON.relative_to(REPO_ROOT)} is out of step: run {GENERATOR}", file=sys.stderr)
        return 1
    FLEET_JSON.parent.mkdir(parents=True, exist_ok=True)
    FLEET_JSON.write_text(wanted)
    print(f"wrote {FLEET_JSON.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
