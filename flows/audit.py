"""`privacy-audit`: the empirical privacy audit as a Prefect flow, its numbers in the Prefect UI.

Composition only: calibrate the audited mechanism, write D and D' and sum them with the release's
own extraction, draw many releases of each and run both checks, then publish the public numbers
(claimed epsilon, black-box lower bound, white-box shift check, sensitivity check, pass/fail) as the
markdown artifact `privacy-audit`. The steps are the tasks of `tasks.audit`; the un-noised sums pass
between tasks in memory only (never persisted or cached).

This flow is for deployments and the UI. `mepf audit` runs the same functions without a Prefect run
(`tasks.audit.run_audit`): the default audit takes about 40 s and starting an ephemeral Prefect
server costs 10-25 s more here (at 500 draws: 29.5 s as a flow, 5.1 s of it the audit). Both return
the same report.
"""

from __future__ import annotations

import time

from prefect import flow

from mepf_core.privacy.sensitivity import Neighbouring
from tasks.audit import (DEFAULT_DRAWS, WHITE_BOX_CONFIDENCE, audit_draws, design_audit_mechanism, extract_neighbours,
                         publish_audit)


@flow(name="privacy-audit", log_prints=False)
def privacy_audit(target_epsilon: float = 1.0, target_delta: float = 1e-5, draws: int = DEFAULT_DRAWS,
                  relation: Neighbouring = Neighbouring.ADD_REMOVE, labelled: bool = False, moments: int = 1,
                  norm_bound: float = 1.0, second_moment_bound: float = 1.0, confidence: float = 0.95,
                  white_box_confidence: float = WHITE_BOX_CONFIDENCE, broken: bool = True,
                  encoder: str = "efficientnet-lite0") -> dict:
    """Audit the claimed epsilon of the production release path (the parameters of `run_audit`)."""
    started = time.perf_counter()
    mechanism = design_audit_mechanism(target_epsilon=target_epsilon, target_delta=target_delta, relation=relation,
                                       labelled=labelled, moments=moments, norm_bound=norm_bound,
                                       second_moment_bound=second_moment_bound, draws=draws, confidence=confidence,
                                       white_box_confidence=white_box_confidence)
    neighbours = extract_neighbours(mechanism, labelled=labelled, moments=moments, norm_bound=norm_bound,
                                    second_moment_bound=second_moment_bound, encoder=encoder)
    report = audit_draws(neighbours, mechanism, target_epsilon=target_epsilon, labelled=labelled, moments=moments,
                         encoder=encoder, draws=draws, confidence=confidence,
                         white_box_confidence=white_box_confidence, broken=broken)
    report["seconds"] = round(time.perf_counter() - started, 2)
    publish_audit(report)
    return report
