"""The audit as a Prefect flow (`privacy-audit`): it runs, its report matches `run_audit`'s, and its
public numbers reach the Prefect UI as a markdown artifact. Also the audit's layering: the maths in
`mepf_core.privacy.audit_run` imports no Prefect, and `mepf audit` does not import `flows.cli` back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from flows.audit import privacy_audit

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_privacy_audit_flow_runs_and_publishes_its_artifact():
    state = privacy_audit(draws=100, broken=False, return_state=True)
    assert state.is_completed()
    report = state.result()
    assert report["draws"] == 100 and report["pass"] and report["within_sensitivity"]
    assert report["neighbours"] == "add-remove: D plus one Fashion-MNIST test image"
    assert report["shift"] == pytest.approx(report["shift_bound"], rel=1e-5)  # the lattice keeps a norm-C record to within about a step of 2^20 (1e-6)
    assert "broken_releases" not in report and report["seconds"] > 0
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["privacy-audit"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    text = artifacts[0].data
    assert text.startswith("# Privacy audit: PASS")
    assert f"| claimed epsilon (delta 1e-05) | {report['claimed_epsilon']:.4f} |" in text
    assert "black-box lower bound" in text and "white-box shift" in text


def test_the_audit_maths_imports_no_prefect_and_the_cli_no_cycle():
    core = _imports(ROOT / "mepf_core" / "privacy" / "audit_run.py") | _imports(ROOT / "mepf_core" / "privacy" / "audit.py")
    assert not any(n.split(".")[0] in ("prefect", "tasks", "flows", "storage") for n in core)
    for module in ("cli_audit.py", "cli_common.py"):
        assert "flows.cli" not in _imports(ROOT / "flows" / module), module
