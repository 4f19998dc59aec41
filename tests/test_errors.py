"""One error base (issue 12): user errors are `MepfError`s and exit 2 with one line; anything else is a
bug and shows its traceback.

Before: `mepf` caught a list of 12 types including `ValueError`, so a programming bug (a `KeyError`,
a `ValueError` deep in the code) exited 2 as a "user error" without a traceback, even with -v.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

import storage.ledger
from flows.cli import main
from mepf_core.errors import InvalidArgumentError, MepfError
from storage.ledger import BudgetExceededError, LedgerError
from tests.helpers import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mepf_core", "storage", "tasks", "flows")


def _exception_classes() -> list[tuple[str, str]]:
    """(module, class) of every class in the packages whose name or a base's name ends in Error/Exception."""
    found = []
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
            if any(n.endswith(("Error", "Exception")) for n in [node.name, *bases]):
                found.append((module, node.name))
    return found


def test_every_exception_class_of_the_project_is_a_mepf_error():
    classes = _exception_classes()
    assert len(classes) >= 25, classes  # the parser sees them (ReleaseError family, BudgetExceededError, ...)
    not_mepf = [f"{m}.{c}" for m, c in classes if not issubclass(getattr(importlib.import_module(m), c), MepfError)]
    assert not_mepf == [], f"user-facing errors must derive from mepf_core.errors.MepfError: {not_mepf}"


def test_errors_keep_their_builtin_bases():
    """Existing `except FileNotFoundError` / `pytest.raises(ValueError)` keep working."""
    from mepf_core.encoders import EncoderWeightsMissingError, UnknownEncoderError
    from storage.atomic import TargetExistsError
    from storage.datasets import CorruptImageError, DatasetNotFoundError

    assert issubclass(DatasetNotFoundError, FileNotFoundError) and issubclass(CorruptImageError, ValueError)
    assert issubclass(EncoderWeightsMissingError, FileNotFoundError) and issubclass(UnknownEncoderError, ValueError)
    assert issubclass(TargetExistsError, FileExistsError) and issubclass(InvalidArgumentError, ValueError)


def test_boundary_validation_raises_a_user_error():
    from mepf_core.privacy.calibration import validate_delta
    from mepf_core.privacy.sensitivity import parse_neighbouring

    for call in (lambda: validate_delta(1.5), lambda: parse_neighbouring("add_remove")):
        with pytest.raises(InvalidArgumentError):
            call()


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture
def ledger(tmp_path) -> Path:
    path = tmp_path / "ledger.jsonl"
    path.write_text("")
    return path


def _raise(exc: BaseException):
    def boom(*args, **kwargs):
        raise exc
    return boom


def _validation_error() -> ValidationError:
    class M(BaseModel):
        steps: int

    try:
        M(steps="many")
    except ValidationError as exc:
        return exc
    raise AssertionError("pydantic accepted a bad value")


@pytest.mark.parametrize("exc, text", [
    (LedgerError("ledger line 3 is not valid JSON"), "LedgerError: ledger line 3 is not valid JSON"),
    (MepfError("any user error, subclass or not"), "MepfError: any user error, subclass or not"),
    (InvalidArgumentError("n must be > 0, got 0"), "InvalidArgumentError: n must be > 0, got 0"),
])
def test_a_user_error_exits_2_with_one_line(ledger, monkeypatch, capsys, exc, text):
    monkeypatch.setattr(storage.ledger.BudgetLedger, "summary", _raise(exc))
    for verbose in ([], ["-v"]):
        assert main([*verbose, "budget", "--ledger", str(ledger)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.splitlines()[-1] == f"mepf budget: error: {text}"
        assert ("Traceback (most recent call last)" in err) == bool(verbose)  # issue 13: -v adds the traceback


def test_a_validation_error_exits_2_with_one_line_naming_the_field(ledger, monkeypatch, capsys):
    monkeypatch.setattr(storage.ledger.BudgetLedger, "summary", _raise(_validation_error()))
    assert main(["budget", "--ledger", str(ledger)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mepf budget: error: ValidationError: steps: ") and "many" in err


@pytest.mark.parametrize("exc", [KeyError("moment3"), ValueError("a bug, not a user error")])
def test_a_bug_propagates_in_process(ledger, monkeypatch, exc):
    monkeypatch.setattr(storage.ledger.BudgetLedger, "summary", _raise(exc))
    with pytest.raises(type(exc)):
        main(["budget", "--ledger", str(ledger)])


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_bug_exits_non_zero_with_its_traceback(ledger, verbose):
    """`python -m flows.cli` as a user runs it, with a handler that hits a programming bug."""
    script = (
        "import sys, storage.ledger\n"
        "def boom(self):\n    return {}['moment3']\n"
        "storage.ledger.BudgetLedger.summary = boom\n"
        "from flows.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *verbose, "budget", "--ledger", str(ledger)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr and "KeyError: 'moment3'" in proc.stderr
    assert "in boom" in proc.stderr and "mepf budget: error" not in proc.stderr


def test_a_task_error_inside_the_flow_keeps_its_type_and_exits_2(tmp_path, capsys):
    """Prefect 3 re-raises a task's own exception from a flow called directly: `check_budget`'s
    BudgetExceededError reaches `main` as itself (not wrapped), so it is still a one-line user error."""
    write_image_folder(tmp_path / "data")
    ledger = tmp_path / "ledger.jsonl"
    code = main(["release", "--dataset", f"imagefolder:{tmp_path / 'data'}", "--target-epsilon", "1", "--labelled",
                 "--out", str(tmp_path / "r.h5"), "--ledger", str(ledger), "--budget", "0.5", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    # the CLI's own output is one line, the last: Prefect may log the failed task run above it
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mepf release: error: {BudgetExceededError.__name__}: release would spend epsilon 1")
    assert not (tmp_path / "r.h5").exists()
