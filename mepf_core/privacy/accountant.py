"""Privacy accounting across releases: frozen events and an accountant that composes them.

Mechanisms are described by frozen events (Google dp_accounting style); the accountant composes a
history of events and reads off epsilon at a delta (opacus style). Nothing here reads or writes
files: storage.ledger persists the events and asks this module what they cost.

Derivation (why epsilon at one delta is a valid guarantee, whatever each release's own delta)
------------------------------------------------------------------------------------------------
Every release is a discrete Gaussian mechanism on an integer lattice (`mepf_core.privacy.lattice`): all
its parts are sums with L2 sensitivity Delta_k under the release's relation, noised with scale sigma_k, and
part k is rho_k-zCDP with rho_k = 1 / (2 z_k^2) (z_k = sigma_k / Delta_k), so the release is rho-zCDP with
rho = 1 / (2 z^2), effective multiplier z = (sum_k z_k^-2)^-1/2. A zCDP mechanism is not "(epsilon,
delta)" for one pair: it satisfies (epsilon, delta(epsilon)) for EVERY epsilon >= 0 at once (its Renyi
divergences bound a whole privacy profile; Bun & Steinke 2016, Prop. 1.3, and the tighter conversion of
Balle et al. 2020, Thm 21, that autodp implements). The delta a release was calibrated at only picks the
point of that profile it reports; the mechanism, and so the privacy loss, is fixed by z alone.
Releases of one dataset compose (adaptively) by adding rho (Bun & Steinke 2016, Lemma 2.3), so to rho-zCDP
with 1/z^2 = sum_r 1/z_r^2, which again satisfies (eps, delta(eps)) for every eps. Reading the composed
profile at the account's delta gives eps* with (eps*, delta)-DP for all releases together. Consequences:
  * no delta is summed, and no release's own delta enters the account, so a release calibrated at
    a large delta is charged for the noise it really has and cannot make the reported spend drop;
  * adding a release only lowers the composed z, so spent epsilon never decreases;
  * composing rho is never looser than basic composition of the releases' own zCDP (epsilon, delta)
    pairs (sum of epsilons at the sum of deltas) at the deltas this code uses.
Ledger events written before schema 2 (float Gaussian noise) are counted the same way, at the rho of
the ideal continuous Gaussian they claimed; what their floating-point bits may have leaked beyond it
(`mepf_core.privacy.lattice`) no account can charge, which is why the reader refuses those files.

Relation rule. Sensitivities, and so z, are relative to one neighbouring relation, and the
composition above is only valid for releases of one relation. An account's relation is that of its
first event with a known relation; composing an event of the other relation is refused
(RelationMixingError), never converted. Events of unknown relation (`relation=None`: ledger charges
written before relations were recorded) are counted by the one rule that never under-counts:
  * under replace-one they count at z / 2. A replace-one pair D, D' = D - x + x' is two add-remove
    steps (D -> D - x -> D'), so each part's mean moves by at most 2 Delta_add-remove (per part:
    sums 2C vs C, labelled counts sqrt 2 <= 2 x 1, unlabelled counts 0 <= 2); a release with
    add-remove multiplier z has replace-one multiplier >= z / 2, and one with replace-one
    multiplier z has z >= z / 2. Either way z / 2 over-counts or is exact.
  * under add-remove they cannot be bounded at all (a replace-one unlabelled release publishes n
    exactly, which add-remove must noise): epsilon is infinite, and composing an add-remove event
    onto an account holding unknown-relation events is refused.
An account holding only unknown-relation events has relation UNKNOWN and its replace-one spend.
A history that already mixes the two relations (only possible in a hand-edited ledger) can be
loaded with `GaussianAccountant.from_history`; its relation is MIXED and its epsilon infinite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mepf_core.errors import InvalidArgumentError
from mepf_core.privacy.calibration import epsilon_spent
from mepf_core.privacy.sensitivity import Neighbouring

ADD_REMOVE, REPLACE_ONE = Neighbouring.ADD_REMOVE.value, Neighbouring.REPLACE_ONE.value
UNKNOWN = "unknown"  # only events whose relation was not recorded
MIXED = "mixed"  # both relations in one history: spend is infinite


class RelationMixingError(InvalidArgumentError):
    """An event's neighbouring relation cannot be composed with the account's (see the relation rule)."""


@dataclass(frozen=True)
class GaussianRelease:
    """One release, as the accountant sees it: a Gaussian mechanism under one neighbouring relation.

    noise_multiplier: effective z = sigma / sensitivity of the whole release (unitless, finite, > 0);
    relation: "add-remove" or "replace-one" (a Neighbouring or its value), or None when the relation
        was not recorded (legacy ledger charges; counted by the relation rule in the module docstring).
    Raises ValueError for a non-positive or non-finite z or an unknown relation.
    """

    noise_multiplier: float
    relation: str | None = ADD_REMOVE

    def __post_init__(self):
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not (math.isfinite(z) and z > 0):
            raise ValueError(f"every noise multiplier must be a finite number > 0, got {z}")
        if self.relation is not None:
            object.__setattr__(self, "relation", Neighbouring(self.relation).value)


def composed_epsilon(noise_multipliers: Sequence[float], *, delta: float, name: str = "delta") -> float:
    """Epsilon at `delta` of the exact composition of Gaussian mechanisms with these z; 0.0 for none.

    Same relation assumed (no relation handling here). Raises ValueError for a bad z or delta.
    """
    if not noise_multipliers:
        return 0.0
    return epsilon_spent(list(noise_multipliers), delta=delta, name=name)


class GaussianAccountant:
    """Composes GaussianRelease events under the relation rule (module docstring); immutable.

    `compose` returns a new accountant and refuses (RelationMixingError) an event whose relation
    the account cannot absorb; `from_history` loads any recorded history, refusing nothing.
    """

    def __init__(self, events: Iterable[GaussianRelease] = ()):
        accountant = GaussianAccountant.from_history(())
        for event in events:
            accountant = accountant.compose(event)
        self._events: tuple[GaussianRelease, ...] = accountant._events

    @classmethod
    def from_history(cls, events: Iterable[GaussianRelease]) -> "GaussianAccountant":
        """An accountant holding `events` as recorded, mixed relations included (epsilon inf then)."""
        accountant = cls.__new__(cls)
        accountant._events = tuple(events)
        for e in accountant._events:
            if not isinstance(e, GaussianRelease):
                raise TypeError(f"events must be GaussianRelease, got {type(e).__name__}")
        return accountant

    @property
    def events(self) -> tuple[GaussianRelease, ...]:
        return self._events

    @property
    def legacy_events(self) -> int:
        """Number of events of unknown relation."""
        return sum(e.relation is None for e in self._events)

    @property
    def relation(self) -> str | None:
        """"add-remove", "replace-one", UNKNOWN (only unknown-relation events), MIXED, or None (no event)."""
        known = {e.relation for e in self._events if e.relation is not None}
        if not self._events:
            return None
        if len(known) > 1:
            return MIXED
        return known.pop() if known else UNKNOWN

    def compose(self, event: GaussianRelease) -> "GaussianAccountant":
        """A new accountant with `event` added.

        Raises RelationMixingError when the account's relation is the other one (or MIXED), or when
        an add-remove event meets unknown-relation events (they cannot be bounded under add-remove).
        """
        if not isinstance(event, GaussianRelease):
            raise TypeError(f"event must be a GaussianRelease, got {type(event).__name__}")
        relation = self.relation
        if event.relation is not None:
            if relation in (ADD_REMOVE, REPLACE_ONE, MIXED) and relation != event.relation:
                raise RelationMixingError(f"the account is {relation} and the event is {event.relation}; "
                                          f"epsilons do not compose across relations")
            if event.relation == ADD_REMOVE and self.legacy_events:
                raise RelationMixingError(f"the account holds {self.legacy_events} event(s) of unknown relation, "
                                          f"which cannot be bounded under add-remove")
        elif relation in (ADD_REMOVE, MIXED):
            raise RelationMixingError(f"an event of unknown relation cannot be bounded under {relation}")
        return GaussianAccountant.from_history(self._events + (event,))

    def get_epsilon(self, delta: float, *, name: str = "delta") -> float:
        """Epsilon at `delta` of all events together: 0.0 for none, inf for MIXED or for unknown-relation
        events under add-remove. Raises ValueError for a delta autodp cannot use (message names `name`)."""
        relation = self.relation
        if relation is None:
            return 0.0
        if relation == MIXED or (relation == ADD_REMOVE and self.legacy_events):
            return math.inf
        zs = [e.noise_multiplier / 2 if e.relation is None else e.noise_multiplier for e in self._events]
        return composed_epsilon(zs, delta=delta, name=name)
