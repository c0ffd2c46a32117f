"""docs/logging.md: the processor snippet for users with their own collector is the chart's."""

from __future__ import annotations

import re

import yaml

from slm_devtools import tools
from slm_devtools.logplane import collector_config, render_chart

DOC = tools.REPO_ROOT / "docs" / "logging.md"


def _snippet() -> dict:
    text = DOC.read_text()
    match = re.search(r"<!-- processor-snippet:[^>]*-->\n```yaml\n(.*?)```", text, re.S)
    assert match, "docs/logging.md has no processor snippet"
    snippet: dict = yaml.safe_load(match.group(1))
    return snippet


def test_processor_snippet_parses_the_lines_as_the_chart_does() -> None:
    chart = collector_config(render_chart())
    snippet = _snippet()
    assert snippet["receivers"]["filelog"]["operators"] == chart["receivers"]["filelog"]["operators"]
    assert snippet["processors"]["filter/slm-pods"] == chart["processors"]["filter/slm-pods"]
    for key, value in snippet["processors"]["k8s_attributes"].items():
        assert chart["processors"]["k8s_attributes"][key] == value, key
    assert set(snippet["receivers"]["filelog"]["include"]) <= set(chart["receivers"]["filelog"]["include"])
