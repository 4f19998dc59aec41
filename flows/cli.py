"""`mepf`: the command line, a thin layer over the flows.

Every subcommand validates its arguments before any work starts, exits non-zero with a one-line
message on bad input, and with --json prints one JSON object on stdout (logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("mepf")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# The ephemeral Prefect server migrates a fresh database at start; on 2 busy cores that exceeds
# Prefect's 20 s default ("Timed out while attempting to connect to ephemeral Prefect API server").
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# OpenMP waits with a short bounded spin (mepf_core/openmp.py: faster steps than passive waiting, without
# starving a shared CPU). Must be set before torch loads its OpenMP runtime; the user's own setting wins.
from mepf_core.openmp import bounded_spin_env  # noqa: E402 - light, imports no torch

bounded_spin_env()

from flows.cli_common import CliError, _emit, _model  # noqa: E402 - shared with the subcommand modules
from flows.cli_flags import add_model_flag, add_model_flags, given_values  # noqa: E402
from flows.cli_prefect import run_flow  # noqa: E402 - Prefect API checked before a flow starts


# --- release --------------------------------------------------------------------------------------

def _add_release(sub) -> None:
    from storage.params import ReleaseParams

    p = sub.add_parser("release", help="custodian: private images -> noisy embedding release (spends budget)")
    add_model_flags(p, ReleaseParams, ("dataset", "split", "data_root", "target_epsilon", "target_delta"))
    add_model_flag(p, ReleaseParams, "out", required=True)  # the CLI insists on naming the release file
    add_model_flag(p, ReleaseParams, "labelled", kind="bool")
    add_model_flags(p, ReleaseParams, ("image_size", "channels"))
    add_model_flags(p, ReleaseParams, (
        "moments", "encoder", "encoder_weights", "norm_bound", "second_moment_bound", "neighbouring", "dataset_id",
        "ledger", "budget", "budget_delta", "batch_size", "shards", "limit", "signing_key", "signer_name",
        "cells_per_class", "cell_seed", "cell_reference"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_release)


def _cmd_release(args) -> dict:
    from flows.custodian_release import custodian_release, preflight
    from storage.params import ReleaseParams

    params = _model(ReleaseParams, given_values(args, ReleaseParams))
    _dataset_available(params.dataset, params.split, params.data_root, params.labelled, params.limit,
                       image_size=params.image_size, channels=params.channels)
    preflight(params)
    result = run_flow(custodian_release, params)
    _emit(result, args.json, lambda r: (
        f"release {r['release_id']} written to {r['path']}\n"
        f"  epsilon {r['epsilon']:.4f} at delta {r['delta']:g} ({r['neighbouring']})\n"
        + "\n".join(f"  {k}: sigma {v:.4g}, shape {r['shapes'][k]}" for k, v in r["sigmas"].items())
        + (f"\n  signed by key {r['signed_by']}" if r.get("signed_by") else "")
    ))
    return result


def _dataset_available(dataset: str, split: str, root: str | None, labelled: bool = False,
                       limit: int | None = None, *, image_size: int | None = None, channels: int | None = None) -> None:
    """Local checks before Prefect starts: the dataset opens in the image mode asked for (whole: an
    unreadable subfolder or file refuses it; a named dataset's own format only), and a labelled one
    has >= 2 classes (its structure, not its records).

    A class with no images among the records released (the first `limit` with --limit) is a warning on
    the custodian's terminal, not a refusal: the release's outcome must not depend on one record (a
    class's only image decides whether it is empty), so the release goes ahead and that class's row is
    noise. These messages go to the custodian's terminal only (the flow's errors, which reach Prefect,
    name no record and no class)."""
    from storage.datasets import DatasetCheckError, labelled_release_problems, open_dataset

    # raises DatasetNotFoundError / DatasetCheckError / InvalidArgumentError with a clear message
    src = open_dataset(dataset, split, root, image_size=image_size, channels=channels, limit=limit, allow_empty=True)
    if len(src) == 0:
        logger.warning("%s holds no images: released anyway, as pure noise (refusing would make whether a release "
                       "is made depend on the records)", dataset)
    if not labelled:
        return
    where = f" --limit {limit}" if limit is not None else ""
    hint = f"see `mepf check-data --dataset {dataset} --labelled{where}`"
    if src.num_classes < 2:
        raise DatasetCheckError(f"a labelled release needs at least 2 classes, the dataset has {src.num_classes}; "
                                f"{hint}")
    for problem in labelled_release_problems(src, limit):
        logger.warning("%s: released anyway, that row is pure noise (refusing would make whether a release is "
                       "made depend on one record); %s", problem, hint)


# --- inspect / budget -----------------------------------------------------------------------------

def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print a release file's metadata (validates structure, checksums, the "
                                       "recomputed epsilon and any signature)")
    p.add_argument("file")
    p.add_argument("--trusted-key", action="append", default=None, metavar="PUB",
                   help="Ed25519 public key (PEM); the release must be signed by one of them (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_inspect)


def _signature_text(s: dict) -> str:
    if not s["signed"]:
        return "unsigned"
    trust = {True: ", trusted", False: ", NOT trusted", None: ""}[s["trusted"]]
    return f"valid, by key {s['fingerprint']}" + (f" ({s['signer']})" if s["signer"] else "") + trust


def _cmd_inspect(args) -> dict:
    from storage.release import read_release

    rel = read_release(args.file, trusted_keys=args.trusted_key)
    meta = json.loads(rel.metadata.to_json())
    meta["signature"] = rel.signature.as_dict()
    meta["claim"] = {"verified": True, "epsilon_recomputed": rel.epsilon_recomputed}

    def human(m: dict) -> str:
        lines = [f"{k}: {json.dumps(v)}" for k, v in sorted(m.items()) if k not in ("signature", "claim")]
        lines.append(f"claim: epsilon {m['claim']['epsilon_recomputed']:.6g} recomputed from the recorded noise, "
                     f"matches the recorded epsilon")
        lines.append(f"signature: {_signature_text(m['signature'])}")
        return "\n".join(lines)

    _emit(meta, args.json, human)
    return meta


def _add_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="custodian: create an Ed25519 key pair for signing releases")
    p.add_argument("--out", required=True, help="private key file to create (mode 0600), e.g. custodian.key")
    p.add_argument("--public-out", default=None, help="public key file to create (default: OUT with suffix .pub)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_keygen)


def _cmd_keygen(args) -> dict:
    from storage.signing import generate_keypair

    pair = generate_keypair(args.out, args.public_out)  # FileExistsError: keys are never overwritten
    result = {"private_key": str(pair.private), "public_key": str(pair.public), "fingerprint": pair.fingerprint}
    _emit(result, args.json, lambda r: (
        f"private key {r['private_key']} (keep it secret, mode 0600)\n"
        f"public key  {r['public_key']} (give it to the public side: mepf train --trusted-key)\n"
        f"fingerprint {r['fingerprint']}"))
    return result


def _add_budget(sub) -> None:
    p = sub.add_parser("budget", help="show spent and remaining privacy budget per dataset")
    p.add_argument("--ledger", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_budget)


def _budget_line(d: dict) -> str:
    """One dataset of `mepf budget`: spend at the budget delta, budget (epsilon, delta), relation, remaining."""
    budget = "none" if d["budget_epsilon"] is None else f"(epsilon {d['budget_epsilon']:g}, delta {d['budget_delta']:g})"
    remaining = "-" if d["remaining_epsilon"] is None else f"{d['remaining_epsilon']:.4f}"
    legacy = f", {d['legacy_charges']} without a recorded relation" if d.get("legacy_charges") else ""
    return (f"{d['dataset_id']}: spent epsilon {d['spent_epsilon']:.4f} at delta {d['spent_delta']:g} in "
            f"{d['releases']} release(s) ({d['neighbouring'] or 'no relation yet'}{legacy}); budget {budget}, "
            f"remaining epsilon {remaining}")


def _cmd_budget(args) -> dict:
    from storage.ledger import BudgetLedger

    try:  # only a missing file "does not exist": a folder we may not enter is permission denied (main names it)
        os.stat(args.ledger)
    except FileNotFoundError:
        raise CliError(f"ledger {args.ledger} does not exist") from None
    rows = [b.as_dict() for b in BudgetLedger(args.ledger).summary()]
    result = {"ledger": args.ledger, "datasets": rows}
    _emit(result, args.json, lambda r: "\n".join(_budget_line(d) for d in r["datasets"]) or "no datasets in this ledger")
    return result


# --- public stage --------------------------------------------------------------------------------

def _add_train(sub) -> None:
    from storage.params import TrainParams

    p = sub.add_parser("train", help="public: train a generator from a release file alone")
    add_model_flags(p, TrainParams, ("release", "out", "steps", "batch_size", "conv28_channels", "lr_gen", "lr_mavg",
                                     "lr_schedule", "loss", "checkpoint_every", "seed", "ema_decay", "device",
                                     "precision", "encoder_weights", "resume"))
    add_model_flag(p, TrainParams, "trusted_keys", "--trusted-key", kind="append", metavar="PUB",
                   help="Ed25519 public key (PEM) of a trusted custodian: refuse a release that is unsigned or "
                        "signed by any other key (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args) -> dict:
    from flows.train_generator import train_generator
    from storage.params import TrainParams

    params = _model(TrainParams, given_values(args, TrainParams))  # only typed flags count as set (resume)
    result = run_flow(train_generator, params)
    _emit(result, args.json, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))
    return result


def _add_sample(sub) -> None:
    from storage.params import SampleParams

    p = sub.add_parser("sample", help="public: draw a synthetic dataset from a trained run")
    add_model_flags(p, SampleParams, ("run", "n"))
    add_model_flag(p, SampleParams, "out", required=True,
                   help="synthetic.h5, synthetic.parquet (Hugging Face datasets Image layout), synthetic.npz "
                        "(x: N x H x W x C uint8, y), or DIR/ (image folder: one PNG subfolder per class, "
                        "torchvision ImageFolder); DATASET_CARD.md is written beside it")
    add_model_flag(p, SampleParams, "seed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_sample)


def _cmd_sample(args) -> dict:
    from flows.train_generator import sample
    from storage.params import SampleParams

    params = _model(SampleParams, given_values(args, SampleParams))
    result = run_flow(sample, params)
    _emit(result, args.json, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))
    return result


def _add_evaluate(sub) -> None:
    from storage.params import EvaluateParams

    p = sub.add_parser("evaluate", help="public: FID and downstream accuracy on a real test split")
    add_model_flags(p, EvaluateParams, ("run", "synthetic", "reference", "data_root", "fid_samples", "fid_reference",
                                        "classifiers", "train_samples", "ceiling", "allow_private_reference",
                                        "allow_small_fid", "draw_samples", "seed", "out"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args) -> dict:
    """Evaluate a run; a run not sampled yet gets RUN/synthetic.h5 drawn by the flow (flows.evaluate.synthetic_for)."""
    from flows.evaluate import evaluate
    from storage.params import EvaluateParams

    params = _model(EvaluateParams, given_values(args, EvaluateParams))
    result = run_flow(evaluate, params)
    _emit(result, args.json, _metrics_text)
    return result


def _metrics_text(r: dict) -> str:
    lines = [f"report: {r['report']}"]
    counts = (f" ({r['fid_synthetic_count']} synthetic / {r['fid_reference_count']} reference images)"
              if r.get("fid_synthetic_count") else "")
    lines += [f"  {k}: {v:.4f}" + (counts if k.startswith("fid") else "") for k, v in r["metrics"].items()]
    lines += [f"  ceiling {k}: {v:.4f}" for k, v in r.get("ceiling", {}).items()]
    return "\n".join(lines)


def _add_run(sub) -> None:
    from storage.params import PipelineParams

    p = sub.add_parser("run", help="the whole pipeline: release -> train -> sample -> evaluate")
    p.add_argument("--config", default=None, help="YAML or JSON file with the pipeline's parameters")
    add_model_flags(p, PipelineParams, ("out_dir", "target_epsilon", "steps"))  # typed flags override the file
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args) -> dict:
    import yaml

    from flows.pipeline import dp_mepf_pipeline
    from storage.params import PipelineParams

    values: dict = {}
    if args.config is not None:
        if not os.path.isfile(args.config):
            raise CliError(f"config file {args.config} does not exist")
        with open(args.config) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise CliError(f"config file {args.config} is not valid YAML/JSON: {exc}") from None
        if not isinstance(values, dict):
            raise CliError(f"config file {args.config} must hold a mapping of parameters")
    values.update(given_values(args, PipelineParams))
    params = _model(PipelineParams, values, check=lambda p: p.stage_params())
    result = run_flow(dp_mepf_pipeline, params)
    _emit(result, args.json, lambda r: (
        f"release:  {r['release']} (epsilon {r['epsilon']:.3g}, delta {r['delta']:g})\n"
        f"run:      {r['run']['run_dir']}\nsamples:  {r['samples']['path']}\n" + _metrics_text(r)))
    return result


# --- plumbing -------------------------------------------------------------------------------------

def _add_audit(sub) -> None:
    from flows.cli_audit import add_audit_subcommand

    add_audit_subcommand(sub)


def _add_check_data(sub) -> None:
    from flows.cli_check_data import add_check_data_subcommand

    add_check_data_subcommand(sub)


def _add_sweep_and_report(sub) -> None:
    from flows.cli_sweep import add_sweep_subcommands

    add_sweep_subcommands(sub)


SUBCOMMANDS: list[Callable] = [_add_release, _add_keygen, _add_inspect, _add_budget, _add_train, _add_sample,
                               _add_evaluate, _add_run, _add_audit, _add_check_data, _add_sweep_and_report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mepf", description="DP-MEPF: private image generation from a noisy feature embedding")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `mepf` subcommand; returns the exit status.

    0 on success; 2 on a user error, printed as one line `mepf CMD: error: TYPE: MESSAGE` on stderr
    (with -v, after the error's traceback): any `mepf_core.errors.MepfError`, a pydantic
    `ValidationError`, or an `OSError` of the environment (permission denied, read-only file system,
    full disk, a file locked by another process, an I/O error: `mepf_core.errors.file_access_error`
    names the cause and what to do); 130 on Ctrl-C. Any other exception is a bug and propagates with
    its traceback (exit status 1 from the interpreter), with or without -v. argparse itself exits 2
    on a malformed command line.
    """
    import flows.cli_common as common

    parser = build_parser()
    args = parser.parse_args(argv)
    common.VERBOSE = args.verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one line per HTTP request to the local Prefect server is noise, not progress
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from pydantic import ValidationError

    try:
        args.handler(args)
    except ValidationError as exc:  # parameters refused by a pydantic model: one line naming each field
        msgs = "; ".join(common._describe_error(e) for e in exc.errors())
        return _user_error_line(args, exc, f"{type(exc).__name__}: {msgs}")
    except KeyboardInterrupt:
        sys.stderr.write(f"mepf {args.command}: interrupted\n")
        return 130
    except Exception as exc:  # a MepfError, or an OSError of the environment; anything else is a bug
        error = common.user_error(exc)
        if error is None:
            raise
        return _user_error_line(args, exc, f"{type(error).__name__}: {error}")
    return 0


def _user_error_line(args, exc: BaseException, text: str) -> int:
    """Write the one-line message (after the traceback under -v); the exit status of a user error, 2."""
    import re
    import traceback

    if args.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    one_line = re.sub(r"\s*\n\s*", " ", text.strip())
    sys.stderr.write(f"mepf {args.command}: error: {one_line}\n")
    return 2


if __name__ == "__main__":  # python -m flows.cli: the same as the `mepf` console script
    from flows.mepf_command import entry

    entry()
