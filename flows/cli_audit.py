"""`mepf audit`: check the release path's privacy claim empirically (registered by flows.cli).

Runs `tasks.audit.run_audit`, the plain functions, without a Prefect run: an ephemeral Prefect
server would cost 10-25 s against about 40 s for the whole default audit. The same audit as a
Prefect flow, with its numbers as a UI artifact, is `flows.audit.privacy_audit` (`privacy-audit`).
Imports `flows.cli_common`, never `flows.cli` (which imports this module to register it).

Exit status 0 when the audit passes (the black-box lower bound does not exceed the claimed epsilon,
the white-box shift interval does not lie above the shift the claim allows, and the neighbours'
sums moved by at most the claimed sensitivities), 1 when any of them refutes the claim, 2 on bad
arguments.
"""

from __future__ import annotations

import math
import sys

from flows.cli_common import CliError, _emit


def add_audit_subcommand(sub) -> None:
    p = sub.add_parser("audit", help="draw many releases of neighbouring datasets and bound epsilon from below")
    p.add_argument("--epsilon", type=float, default=1.0, help="target epsilon of the audited release")
    p.add_argument("--delta", type=float, default=1e-5, help="target delta, in (0, 1)")
    p.add_argument("--draws", type=int, default=None, help="releases per dataset and mechanism (default 5000)")
    p.add_argument("--neighbouring", default="add-remove", choices=["add-remove", "replace-one"])
    p.add_argument("--labelled", action="store_true", help="audit a labelled release (two classes)")
    p.add_argument("--moments", type=int, default=1, choices=[1, 2])
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_audit)


def _validate(args) -> None:
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise CliError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    if not 0 < args.delta < 1:
        raise CliError(f"--delta must be in (0, 1), got {args.delta}")
    if args.draws is not None and args.draws < 100:
        raise CliError(f"--draws must be >= 100, got {args.draws}")


def _human(r: dict) -> str:
    w = r["white_box"]
    lines = [
        f"audit of the {r['neighbouring']} release path ({r['encoder']}, D={r['feature_dim']}, "
        f"{'labelled' if r['labelled'] else 'unlabelled'}, moments={r['moments']}): {r['draws']} releases "
        f"per dataset",
        f"  claimed epsilon {r['claimed_epsilon']:.4f} at delta {r['delta']:g}",
        f"  empirical lower bound {r['empirical_epsilon_lower_bound']:.4f} "
        f"({r['confidence']:.0%} CI {_interval(r['ci'])}, test {r['bound']['test']})",
        f"  black box {'PASS' if r['black_box_pass'] else 'FAIL'}: the lower bound "
        f"{'does not exceed' if r['black_box_pass'] else 'exceeds'} the claim",
        f"  white box: {_white(r['white_box'])}",
        f"  white box {'PASS' if w['pass'] else 'FAIL'}: the shift is {'within' if w['pass'] else 'beyond'} "
        f"what the claim allows ({w['allowed_shift']:.4f})",
    ]
    if not r["within_sensitivity"]:
        moved = ", ".join(f"{k} {m['moved']:.4g} > {m['sensitivity']:.4g}" for k, m in r["movement"].items()
                          if not m["within"])
        lines.append(f"  FAIL: the neighbours' sums moved by more than the claimed sensitivity ({moved})")
    lines.append("  PASS: no check refutes the claim" if r["pass"] else "  FAIL: the claim is refuted")
    for b in r.get("broken_releases", []):
        lines.append(f"  broken release {b['bug']}: lower bound {b['lower_bound']:.4f}, white-box shift "
                     f"{_interval(b['white_box']['ci'])} vs allowed {b['white_box']['allowed_shift']:.4f} "
                     f"({'caught' if b['caught'] else 'not caught'})")
    lines.append(f"  {r['seconds']:.1f} s")
    return "\n".join(lines)


def _white(w: dict) -> str:
    shift = "unbounded" if w["shift"] is None else f"{w['shift']:.4f}"
    eps = w["implied_epsilon_ci"]
    return (f"shift {shift} ({w['confidence']:.1%} CI {_interval(w['ci'])}, test {w['test']}), implied epsilon "
            f"{_number(w['implied_epsilon'])} (CI [{_number(eps[0])}, {_number(eps[1])}])")


def _number(x) -> str:
    """None is unbounded (a part without noise); huge values (rounding error as the only noise) in %g."""
    if x is None:
        return "inf"
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.3g}"


def _interval(ci: list) -> str:
    return f"[{_number(ci[0])}, {_number(ci[1])}]"


def _cmd_audit(args) -> dict:
    from mepf_core.privacy.sensitivity import Neighbouring
    from tasks.audit import DEFAULT_DRAWS, run_audit

    _validate(args)
    report = run_audit(target_epsilon=args.epsilon, target_delta=args.delta,
                       draws=args.draws if args.draws is not None else DEFAULT_DRAWS,
                       relation=Neighbouring(args.neighbouring), labelled=args.labelled, moments=args.moments)
    _emit(report, args.json, _human)
    if not report["pass"]:
        sys.stdout.flush()
        raise SystemExit(1)
    return report
