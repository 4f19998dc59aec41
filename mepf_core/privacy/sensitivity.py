"""Neighbouring relations and the L2 sensitivity of every released part.

What is released (before noise) for K label classes (K = 1 when unlabelled):

    S1[c] = sum_{i: y_i = c} phi1(x_i)      (K x D)   first-moment sums
    S2[c] = sum_{i: y_i = c} phi2(x_i)      (K x D)   second-moment sums (optional)
    N[c]  = #{i: y_i = c}                   (K,)      counts

with ||phi1(x)||_2 <= C1 and ||phi2(x)||_2 <= C2 for EVERY input x (enforced by
`mepf_core.features.bound_norm`; phi2 >= 0 elementwise, phi1 has any sign). The public side
divides (post-processing): mean embedding = S / N. Releasing sums and noisy counts instead of
means keeps every private number noised: the reference code's flaw of using exact class counts
cannot happen.

Relation "add-remove" (default): D' = D plus or minus one record (x, y).
    Only class y changes, by exactly one term:
        ||S1(D) - S1(D')||_F = ||phi1(x)||_2 <= C1
        ||S2(D) - S2(D')||_F = ||phi2(x)||_2 <= C2
        ||N(D)  - N(D')||_2  = 1
    Tight: any x with ||phi1(x)|| = C1 attains it.

Relation "replace-one": D' = D with one record (x, y) replaced by (x', y'); n is public.
    Same class (y = y'): ||phi(x') - phi(x)||_2 <= ||phi(x')|| + ||phi(x)|| <= 2C, attained by
    antipodal features (possible for phi1, whose entries have any sign). For phi2 >= 0 the
    triangle bound 2C2 is kept: sqrt(2)C2 holds only for orthogonal-or-closer non-negative
    vectors, and we do not rely on that finer geometry.
    Other class (y != y'): two rows change by phi(x) and phi(x'): sqrt(C^2 + C^2) = sqrt(2)C <= 2C.
        => S1: 2 C1, S2: 2 C2.
    Counts: labelled, two classes move by 1 each: sqrt(2); unlabelled, N = n never changes: 0,
    so n is released exactly and recorded as public (the relation makes it public).

Within-class cells (`mepf_core.cells`): with M cells per class the rows are (class, cell) pairs,
K M of them, and a record's row is a function of that record alone. Every bound above holds with
"class" read as "row" (add-remove: one row moves; replace-one: one or two rows move). The counts are
public under replace-one only when every record shares one row (unlabelled and M = 1): with cells, a
replaced record can move between cells, so two counts move by 1 each: sqrt(2), whether labelled or not.
"""

from __future__ import annotations

import math
from enum import Enum

from mepf_core.errors import InvalidArgumentError


class Neighbouring(str, Enum):
    """The neighbouring relation a release's (epsilon, delta) guarantee is stated under (module docstring).

    ADD_REMOVE ("add-remove"): the datasets differ by one record added or removed; n is private.
    REPLACE_ONE ("replace-one"): equal, public size n, one record replaced. The value is the
    spelling used on the command line, in release metadata and in the ledger.
    """

    ADD_REMOVE = "add-remove"
    REPLACE_ONE = "replace-one"


def parse_neighbouring(value: "str | Neighbouring") -> Neighbouring:
    """The relation spelled `value` ("add-remove" or "replace-one"); InvalidArgumentError otherwise."""
    try:
        return Neighbouring(value)
    except ValueError:
        allowed = ", ".join(n.value for n in Neighbouring)
        raise InvalidArgumentError(f"neighbouring must be one of {allowed}, got {value!r}") from None


def sum_sensitivity(relation: Neighbouring, norm_bound: float) -> float:
    """L2 (Frobenius) sensitivity of the K x D per-class sums of features bounded by `norm_bound`."""
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise InvalidArgumentError(f"norm_bound must be a finite number > 0, got {norm_bound}")
    return norm_bound if relation is Neighbouring.ADD_REMOVE else 2.0 * norm_bound


def count_sensitivity(relation: Neighbouring, *, labelled: bool, cells_per_class: int = 1) -> float:
    """L2 sensitivity of the per-row counts (0: the counts are public under the relation).

    Rows are classes (one row when unlabelled) times `cells_per_class`; module docstring."""
    if relation is Neighbouring.ADD_REMOVE:
        return 1.0
    return math.sqrt(2.0) if labelled or cells_per_class > 1 else 0.0
