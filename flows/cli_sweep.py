"""`mepf sweep` and `mepf report` (registered by flows.cli): privacy against utility over several runs.

`mepf sweep --epsilons 0.2 1 10 --out DIR [--budget EPS] [--ledger FILE] [pipeline flags]` runs the
`dp-mepf-sweep` flow (`flows.sweep`): the whole pipeline per epsilon in DIR/eps-<e>/, every release
charged to one ledger (DIR/ledger.jsonl by default), then the combined table and plot in DIR/report/.
A release the budget cannot afford is refused, reported, and the sweep goes on with the next
epsilon; finished epsilons are reused when the command is run again. The flags are generated from
`storage.params.SweepParams` (the pipeline's fields, `mepf run`'s config keys). Exit status 0 when
the sweep ran (refusals included: see the output), 2 on bad arguments or a ledger without budget.

`mepf report RUN_DIR... [--out OUT]` rebuilds the combined table and plot from finished runs without
recomputing anything (`storage.combined_report`): each RUN_DIR is a pipeline folder (holding
`report/`) or an evaluation folder (holding metrics.parquet / metrics.json). OUT defaults to
`report/` in the runs' common parent folder (DIR/report for DIR/eps-*: what the sweep wrote).

Imports `flows.cli_common`, never `flows.cli` (which imports this module to register it).
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.cli_common import _emit, _model
from flows.cli_flags import add_model_flag, add_model_flags, given_values

_SWITCHED = ("labelled", "allow_small_fid")  # bool fields whose default is True: --flag / --no-flag


def _names(text: str) -> tuple[str, ...]:
    """--classifiers logreg,mlp -> ("logreg", "mlp")."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_sweep_subcommands(sub) -> None:
    from storage.params import SweepParams

    p = sub.add_parser("sweep", help="the whole pipeline at several epsilons against one budget ledger, then one "
                                     "table and plot of privacy against utility")
    add_model_flag(p, SweepParams, "epsilons", nargs="+", type=float, metavar="EPSILON")
    add_model_flag(p, SweepParams, "out", metavar="DIR")
    for name in SweepParams.model_fields:
        if name in ("epsilons", "out"):
            continue
        if name in _SWITCHED:
            add_model_flag(p, SweepParams, name, kind="bool")
        elif name == "classifiers":
            add_model_flag(p, SweepParams, name, type=_names, metavar="NAME,NAME")
        else:
            add_model_flags(p, SweepParams, (name,))
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_sweep)

    r = sub.add_parser("report", help="rebuild the combined table and plot from finished runs (no recomputing)")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="pipeline folder (holding report/) or evaluation folder")
    r.add_argument("--out", default=None, help="folder for the combined metrics.parquet, metrics.json, metrics.png, "
                                               "report.md (default: report/ in the runs' common parent folder)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(handler=_cmd_report)


def _entry_text(e: dict) -> str:
    head = f"  epsilon {e['epsilon']:g}: {e['status']}"
    if e["status"] == "refused":
        return f"{head}: {e['reason']}"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in e["metrics"].items())
    return f"{head} ({e['folder']}){': ' + metrics if metrics else ''}"


def _sweep_text(r: dict) -> str:
    lines = [f"sweep {r['out']} (ledger {r['ledger']})", *(_entry_text(e) for e in r["epsilons"])]
    lines.append(f"report: {r['report']}" if r["report"] else "report: none (no epsilon finished)")
    return "\n".join(lines)


def _cmd_sweep(args) -> dict:
    from flows.cli_prefect import run_flow
    from flows.sweep import check_budget_set, dp_mepf_sweep
    from storage.params import SweepParams

    params = _model(SweepParams, given_values(args, SweepParams),
                    check=lambda p: [p.pipeline_params(e).stage_params() for e in p.epsilons])
    check_budget_set(params)  # before Prefect starts (the flow checks again)
    result = run_flow(dp_mepf_sweep, params)
    _emit(result, args.json, _sweep_text)
    return result


def default_report_folder(runs: list[str]) -> Path:
    """report/ in the common parent of the runs' folders (DIR/report for DIR/eps-*)."""
    from storage.combined_report import _run_folder

    folders = [_run_folder(Path(r)).resolve() for r in runs]
    common = Path(os.path.commonpath(folders))
    if common in folders:
        common = common.parent
    return common / "report"


def _cmd_report(args) -> dict:
    from storage.combined_report import combine_runs, run_labels, write_combined_report

    out = Path(args.out) if args.out else default_report_folder(args.runs)
    report = write_combined_report(args.runs, out)
    rows = combine_runs(args.runs)
    result = {"report": str(report), "out": str(out), "runs": dict(zip(run_labels(args.runs), args.runs)),
              "plot": str(out / "metrics.png"), "parquet": str(out / "metrics.parquet"),
              "metrics": [{"run": r.run, "metric": r.metric, "value": r.value, "epsilon": r.epsilon}
                          for r in rows if r.class_name is None]}
    _emit(result, args.json, lambda r: "\n".join(
        [f"report: {r['report']}", f"plot:   {r['plot']}",
         *(f"  {m['run']}: {m['metric']} {m['value']:.4f}" for m in r["metrics"])]))
    return result
