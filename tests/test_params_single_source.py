"""Parameters are declared once per stage (storage.params): prefect.yaml, scripts/local_stack.py and
the `mepf` command line repeat no default that differs from the models', and tasks never import flows.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import yaml

from storage.params import EvaluateParams, PipelineParams, ReleaseParams, SampleParams, SweepParams, TrainParams
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # prefect.yaml entrypoint -> the model of its `params`
    "flows/custodian_release.py:custodian_release": ReleaseParams,
    "flows/train_generator.py:train_generator": TrainParams,
    "flows/train_generator.py:sample": SampleParams,
    "flows/evaluate.py:evaluate": EvaluateParams,
}


def _param_lines(node: yaml.MappingNode, text_lines: list[str]) -> dict[str, str]:
    """key -> the yaml source line of that key in a `params` mapping node."""
    return {k.value: text_lines[k.start_mark.line] for k, _ in node.value}


def _find(node: yaml.MappingNode, key: str):
    return next((v for k, v in node.value if k.value == key), None)


def _deployment_params() -> list[tuple[str, type, dict, dict[str, str]]]:
    """(where, model, params, key -> source line) for every deployment and schedule in prefect.yaml."""
    text = (REPO / "prefect.yaml").read_text()
    lines = text.splitlines()
    data, root = yaml.safe_load(text), yaml.compose(text)
    found = []
    for dep, dep_node in zip(data["deployments"], _find(root, "deployments").value):
        model = MODELS[dep["entrypoint"]]
        blocks = [("parameters", dep["parameters"]["params"], _find(_find(dep_node, "parameters"), "params"))]
        for i, (sched, sched_node) in enumerate(zip(dep.get("schedules") or [], (_find(dep_node, "schedules") or
                                                                                 yaml.SequenceNode("", [])).value)):
            if "parameters" in sched:
                blocks.append((f"schedules[{i}]", sched["parameters"]["params"],
                               _find(_find(sched_node, "parameters"), "params")))
        for where, params, node in blocks:
            found.append((f"{dep['entrypoint']} {where}", model, params, _param_lines(node, lines)))
    return found


def test_every_deployment_validates_and_repeats_only_defaults_or_says_why(tmp_path, monkeypatch):
    checked = 0
    for where, model, params, lines in _deployment_params():
        # fields that must exist now (a release file, a run folder) are checked by the flow at run time
        instance = model.model_construct(**params)
        schema_fields = set(model.model_json_schema()["properties"])
        assert set(params) <= schema_fields, (where, set(params) - schema_fields)
        for key in set(model.model_fields) - set(params):
            assert not model.model_fields[key].is_required(), f"{where}: required field {key} missing"
        for key, value in params.items():
            info = model.model_fields[key]
            same = not info.is_required() and value == (info.default.value if hasattr(info.default, "value")
                                                        else info.default)
            if not same:
                assert "#" in lines[key], f"{where}: {key}: {value!r} differs from the model's default " \
                                          f"without a comment saying why"
            checked += 1
        assert instance is not None
    assert checked >= 10
    # and the values validate against the models (with the files they name present)
    monkeypatch.chdir(tmp_path)
    for where, model, params, _ in _deployment_params():
        for key in ("release", "run"):
            if key in params:
                Path(params[key]).parent.mkdir(parents=True, exist_ok=True)
                Path(params[key]).touch() if key == "release" else Path(params[key]).mkdir(exist_ok=True)
        model(**params)


def test_local_stack_non_tiny_params_are_the_model_defaults(tmp_path):
    stack = load_script("local_stack")
    args = argparse.Namespace(tiny=False, epsilon=10.0, budget=20.0, workdir=tmp_path)
    # what the stack sets on purpose: its paths, --epsilon and --budget, no progress bar in a log
    chosen = {"out", "release", "run", "target_epsilon", "ledger", "budget", "progress", "n"}
    jobs = [(ReleaseParams, stack.release_params(args, tmp_path / "r.h5")),
            (TrainParams, stack.train_params(args, tmp_path / "r.h5", tmp_path / "run")),
            (SampleParams, stack.sample_params(args, tmp_path / "run")),
            (EvaluateParams, stack.evaluate_params(args, tmp_path / "run", tmp_path / "report"))]
    for model, params in jobs:
        for key, value in params.items():
            if key not in chosen:
                assert value == model.model_fields[key].default, (model.__name__, key, value)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from flows.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("command,model", [("release", ReleaseParams), ("train", TrainParams),
                                           ("sample", SampleParams), ("evaluate", EvaluateParams),
                                           ("run", PipelineParams), ("sweep", SweepParams)])
def test_cli_defaults_are_the_model_defaults(command, model):
    parser = _subparsers()[command]
    exposed = [a for a in parser._actions if a.dest in model.model_fields]
    assert len(exposed) >= 3
    for action in exposed:
        if action.required:
            continue
        assert action.default == model.model_fields[action.dest].default, (command, action.dest)
    unknown = [a.dest for a in parser._actions if a.dest not in model.model_fields
               and a.dest not in ("help", "json", "config")]
    assert unknown == [], f"`mepf {command}` flags that map to no field of {model.__name__}: {unknown}"


def test_release_labelled_follows_the_model():
    parser = _subparsers()["release"]
    base = ["--target-epsilon", "1", "--out", "r.h5"]
    assert parser.parse_args(base).labelled is ReleaseParams.model_fields["labelled"].default is True
    assert parser.parse_args([*base, "--labelled"]).labelled is True
    assert parser.parse_args([*base, "--no-labelled"]).labelled is False


def test_typed_flags_only_are_set_on_the_model():
    """A resumed run compares only the fields set on purpose: the CLI sets only the flags typed."""
    from flows.cli_flags import given_values

    args = _subparsers()["train"].parse_args(["--release", "r.h5", "--out", "run", "--steps", "5",
                                              "--trusted-key", "a.pem", "--trusted-key", "b.pem"])
    assert given_values(args, TrainParams) == {"release": "r.h5", "out": "run", "steps": 5,
                                               "trusted_keys": ("a.pem", "b.pem")}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package,forbidden", [("tasks", ("flows",)), ("storage", ("prefect", "tasks", "flows"))])
def test_lower_packages_do_not_import_higher_ones(package, forbidden):
    bad = {str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path) if m.split(".")[0] in forbidden)
           for path in sorted((REPO / package).rglob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}
