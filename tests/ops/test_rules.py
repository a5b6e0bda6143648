"""The Prometheus alert rules in ops/prometheus: promtool accepts them and their unit
tests pass; every alert carries a severity, a summary, a description and a runbook link
to its own section of docs/runbook.md; every alert has a promtool case where it fires
and one where it does not.

promtool comes with Debian's ``prometheus`` package (``apt-get install prometheus``);
without it these tests fail rather than skip, so CI cannot pass them by accident.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.tools import tool

ROOT = Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
RUNBOOK_BASE = "https://github.com/chert/chert-relay/blob/main/docs/runbook.md"
SEVERITIES = {"critical", "warning"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule in ops/prometheus/alerts.yml."""
    groups = load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# --- Markdown anchors ------------------------------------------------------------------


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[`*_]{1,2}([^`*_]+)[`*_]{1,2}", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def runbook_headings() -> list[str]:
    headings: list[str] = []
    fenced = False
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            headings.append(m.group(1))
    return headings


def runbook_anchors() -> set[str]:
    anchors: set[str] = set()
    for heading in runbook_headings():
        anchor = github_anchor(heading)
        n = 0
        while (anchor if n == 0 else f"{anchor}-{n}") in anchors:
            n += 1
        anchors.add(anchor if n == 0 else f"{anchor}-{n}")
    return anchors


# --- promtool ------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = tool("promtool")
    return subprocess.run(
        [exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
    assert found is not None, result.stdout
    groups = load_yaml(RULES)["groups"]
    # The reader here sees the same rules as Prometheus does.
    assert int(found.group(1)) == sum(len(g["rules"]) for g in groups)


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


# --- what every alert carries -------------------------------------------------------------


def test_every_alert_has_severity_summary_description_and_its_own_runbook_section() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    anchors = runbook_anchors()
    problems: list[str] = []
    for rule in rules:
        name = rule["alert"]
        labels = rule.get("labels") or {}
        notes = rule.get("annotations") or {}
        if labels.get("severity") not in SEVERITIES:
            problems.append(f"{name}: labels.severity is not one of {sorted(SEVERITIES)}")
        for key in ("summary", "description", "runbook_url"):
            if not str(notes.get(key) or "").strip():
                problems.append(f"{name}: annotations.{key} missing")
        url = str(notes.get("runbook_url", ""))
        base, _, anchor = url.partition("#")
        if base != RUNBOOK_BASE:
            problems.append(f"{name}: runbook_url {url!r} does not start with {RUNBOOK_BASE}#")
        if anchor != github_anchor(name):
            problems.append(f"{name}: runbook_url should end with #{github_anchor(name)}")
        if anchor not in anchors:
            problems.append(f"{name}: docs/runbook.md has no heading for #{anchor}")
        problems += _label_templates(name, rule["expr"], notes)
    assert not problems, "\n".join(problems)


def _label_templates(name: str, expr: str, notes: dict[str, Any]) -> list[str]:
    """Annotations name only labels the alert can carry, and use them when it has any."""
    grouped: set[str] = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        grouped |= {g.strip() for g in group.split(",") if g.strip()}
    grouped.discard("le")
    aggregated = grouped or re.search(r"\b(max|min|sum|count|avg|absent)\s*\(", expr)
    carried = grouped if aggregated else {"instance", "job"}
    text = f"{notes.get('summary', '')} {notes.get('description', '')}"
    used = set(re.findall(r"\$labels\.(\w+)", text))
    problems = [f"{name}: annotations use $labels.{u}, which the alert does not carry"
                for u in sorted(used - carried)]  # fmt: skip
    if carried and not used:
        problems.append(f"{name}: the description should name {sorted(carried)} via $labels")
    return problems


def test_runbook_has_a_section_per_alert_and_its_links_resolve() -> None:
    names = {github_anchor(r["alert"]) for r in alert_rules()}
    sections = {github_anchor(h) for h in runbook_headings() if h.startswith("ChertRelay")}
    assert sections == names, f"sections without an alert: {sorted(sections - names)}"
    anchors = runbook_anchors()
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text())
    assert links, "the runbook links its sections to each other"
    assert not sorted(set(links) - anchors), "links to missing sections"


# --- promtool test coverage ---------------------------------------------------------------


def rule_test_cases() -> list[tuple[str, bool]]:
    """(alert name, fires?) for every alert_rule_test case in alerts_test.yml."""
    data = load_yaml(RULE_TESTS)
    assert data["rule_files"] == [RULES.name]
    cases: list[tuple[str, bool]] = []
    for test in data["tests"]:
        for case in test.get("alert_rule_test") or []:
            cases.append((case["alertname"], bool(case.get("exp_alerts"))))
    return cases


def test_every_alert_has_a_firing_and_a_quiet_promtool_case() -> None:
    names = {r["alert"] for r in alert_rules()}
    cases = rule_test_cases()
    tested = {name for name, _ in cases}
    # promtool passes a case for an alert name that does not exist when it expects nothing.
    assert tested <= names, f"cases for unknown alerts: {sorted(tested - names)}"
    firing = {name for name, fires in cases if fires}
    quiet = {name for name, fires in cases if not fires}
    assert not sorted(names - firing), "alerts without a case where they fire"
    assert not sorted(names - quiet), "alerts without a case where they do not fire"
