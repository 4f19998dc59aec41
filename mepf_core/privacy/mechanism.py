"""Frozen descriptions of one release's Gaussian mechanism: its parts, sensitivities and sigmas.

Built before any private data is read (it depends only on public settings), so a release that
the budget cannot afford is refused before extraction or noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mepf_core.privacy.calibration import calibrate_parts, epsilon_spent, validate_epsilon_delta
from mepf_core.privacy.sensitivity import Neighbouring, count_sensitivity, sum_sensitivity

# Default split of the privacy precision (1/z^2) between parts. Counts are K scalars whose relative
# error is sigma/n_c, so a small share suffices; the sums carry the signal.
COUNT_SHARE = 0.1


@dataclass(frozen=True)
class GaussianPart:
    name: str  # "moment1", "moment2" or "counts"
    sensitivity: float  # L2 sensitivity under the release's neighbouring relation
    noise_multiplier: float  # z = sigma / sensitivity; inf for a part released exactly (sensitivity 0)

    @property
    def sigma(self) -> float:
        return 0.0 if self.sensitivity == 0 else self.noise_multiplier * self.sensitivity

    @property
    def noised(self) -> bool:
        return self.sensitivity > 0


@dataclass(frozen=True)
class ReleaseMechanism:
    relation: Neighbouring
    target_epsilon: float
    target_delta: float
    parts: tuple[GaussianPart, ...]

    @property
    def epsilon(self) -> float:
        """Epsilon actually spent at target_delta (never above target_epsilon)."""
        return epsilon_spent([p.noise_multiplier for p in self.parts if p.noised], delta=self.target_delta)

    @property
    def effective_noise_multiplier(self) -> float:
        """z of the single Gaussian mechanism equivalent to all parts together."""
        return 1.0 / math.sqrt(sum(1.0 / p.noise_multiplier**2 for p in self.parts if p.noised))

    def part(self, name: str) -> GaussianPart:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)


def design_mechanism(
    *,
    target_epsilon: float,
    target_delta: float,
    relation: Neighbouring,
    labelled: bool,
    moments: int,
    norm_bound: float,
    second_moment_bound: float,
    count_share: float = COUNT_SHARE,
) -> ReleaseMechanism:
    """Sensitivities of each part under `relation`, then joint calibration with autodp."""
    validate_epsilon_delta(target_epsilon, target_delta)
    if moments not in (1, 2):
        raise ValueError(f"moments must be 1 or 2, got {moments}")
    if not 0 < count_share < 1:
        raise ValueError(f"count_share must be in (0, 1), got {count_share}")
    sens = {"moment1": sum_sensitivity(relation, norm_bound)}
    if moments == 2:
        sens["moment2"] = sum_sensitivity(relation, second_moment_bound)
    counts_sens = count_sensitivity(relation, labelled=labelled)
    shares = {}
    sum_share = 1.0 - count_share if counts_sens > 0 else 1.0
    for name in sens:
        shares[name] = sum_share / len(sens)
    if counts_sens > 0:
        shares["counts"] = count_share
    z = calibrate_parts(shares, target_epsilon=target_epsilon, target_delta=target_delta)
    parts = [GaussianPart(name, s, z[name]) for name, s in sens.items()]
    parts.append(GaussianPart("counts", counts_sens, z.get("counts", math.inf)))
    return ReleaseMechanism(relation, float(target_epsilon), float(target_delta), tuple(parts))
