"""Frozen descriptions of one release's Gaussian mechanism: its parts, sensitivities and sigmas.

Built before any private data is read (it depends only on public settings), so a release that
the budget cannot afford is refused before extraction or noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mepf_core.cells import validate_cells
from mepf_core.errors import InvalidArgumentError
from mepf_core.privacy.calibration import calibrate_parts, epsilon_spent, validate_epsilon_delta
from mepf_core.privacy.lattice import integer_scale, lattice_unit
from mepf_core.privacy.sensitivity import Neighbouring, count_sensitivity, sum_sensitivity

# Default split of the privacy precision (1/z^2) between parts. Counts are K scalars whose relative
# error is sigma/n_c, so a small share suffices; the sums carry the signal.
COUNT_SHARE = 0.1


@dataclass(frozen=True)
class GaussianPart:
    """One released array and the discrete Gaussian mechanism that protects it (`mepf_core.privacy.lattice`).

    name: "moment1" (K x D first-moment sums), "moment2" (K x D second-moment sums) or "counts"
    (K class counts); sensitivity: the part's L2 sensitivity (Frobenius norm for K x D, in the
    units of the features, bounded by the norm bounds) under the release's neighbouring relation
    (`mepf_core.privacy.sensitivity`), 0 when the relation makes the part public; noise_multiplier:
    z = sigma / sensitivity (no unit), `math.inf` for a part released exactly; lattice_unit: feature units
    per integer step of the part's lattice (`mepf_core.privacy.lattice`: C / 2^20 for the sums, 1 for counts).
    """

    name: str  # "moment1", "moment2" or "counts"
    sensitivity: float  # L2 sensitivity under the release's neighbouring relation
    noise_multiplier: float  # z = sigma / sensitivity; inf for a part released exactly (sensitivity 0)
    lattice_unit: float  # feature units per lattice step

    @property
    def integer_scale(self) -> float:
        """Scale (lattice steps) of the discrete Gaussian added to the integer sums: s^2 >= z^2 (Delta /
        unit)^2 exactly (`lattice.integer_scale`); 0 when exact. s x lattice_unit is sigma up to a few ulps."""
        return 0.0 if self.sensitivity == 0 else integer_scale(self.noise_multiplier, self.sensitivity / self.lattice_unit)

    @property
    def sigma(self) -> float:
        """Standard deviation of the noise added to every entry (units of the part); 0 when exact."""
        return 0.0 if self.sensitivity == 0 else self.noise_multiplier * self.sensitivity

    @property
    def noised(self) -> bool:
        """True when noise is added; False for a part the relation makes public (sensitivity 0)."""
        return self.sensitivity > 0


@dataclass(frozen=True)
class ReleaseMechanism:
    """The frozen description of one release: every part's Gaussian mechanism, composed.

    Depends on public settings only (built by `design_mechanism` before any private data is read).
    relation: the neighbouring relation the guarantee is stated under; target_epsilon, target_delta:
    the (epsilon, delta)-DP target (no unit; delta a probability); parts: one `GaussianPart` per
    released array, in release order. Each noised part is rho_k-zCDP with rho_k <= 1 / (2 z_k^2) (discrete
    Gaussian on its lattice); zCDP composes by adding rho, so the release is rho-zCDP with
    rho = 1 / (2 z^2), 1/z^2 = sum_k 1/z_k^2, turned into (epsilon, delta) by `mepf_core.privacy.calibration`.
    """

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
        """The part called `name` ("moment1", "moment2", "counts"); KeyError when there is none."""
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
    cells_per_class: int = 1,
) -> ReleaseMechanism:
    """Sensitivities of each part under `relation`, then joint calibration with autodp.

    The sums (moment1, and moment2 when `moments` is 2) share 1 - `count_share` of the precision
    1/z^2 equally, the counts get `count_share` (all of it goes to the sums when the counts are
    public: unlabelled with one cell under replace-one). norm_bound, second_moment_bound: the L2 bounds
    C1, C2 of each record's features; cells_per_class: M rows per class (`mepf_core.cells`). Raises
    InvalidArgumentError (a ValueError) for an epsilon or delta out of
    range, moments not 1 or 2, count_share outside (0, 1), cells_per_class not in mepf_core.cells.CELLS_PER_CLASS, a bound not finite and > 0, a target
    autodp cannot reach, or a part whose noise scale exceeds the int64 lattice (`lattice.MAX_INTEGER_SCALE`).
    """
    validate_epsilon_delta(target_epsilon, target_delta)
    if moments not in (1, 2):
        raise InvalidArgumentError(f"moments must be 1 or 2, got {moments}")
    if not 0 < count_share < 1:
        raise InvalidArgumentError(f"count_share must be in (0, 1), got {count_share}")
    validate_cells(cells_per_class)
    sens = {"moment1": sum_sensitivity(relation, norm_bound)}
    if moments == 2:
        sens["moment2"] = sum_sensitivity(relation, second_moment_bound)
    counts_sens = count_sensitivity(relation, labelled=labelled, cells_per_class=cells_per_class)
    shares = {}
    sum_share = 1.0 - count_share if counts_sens > 0 else 1.0
    for name in sens:
        shares[name] = sum_share / len(sens)
    if counts_sens > 0:
        shares["counts"] = count_share
    z = calibrate_parts(shares, target_epsilon=target_epsilon, target_delta=target_delta)
    units = {"moment1": lattice_unit(norm_bound), "moment2": lattice_unit(second_moment_bound) if moments == 2 else None}
    parts = [GaussianPart(name, s, z[name], units[name]) for name, s in sens.items()]
    parts.append(GaussianPart("counts", counts_sens, z.get("counts", math.inf), 1.0))
    for p in parts:
        p.integer_scale  # InvalidArgumentError now, before any data is read, for a scale the int64 sums cannot hold
    return ReleaseMechanism(relation, float(target_epsilon), float(target_delta), tuple(parts))
