"""The audit's maths: worst-case neighbours, many releases, both checks, membership-inference games.

Pure functions over tensors and sums; no Prefect, no files. What needs files lives in
`tasks/audit.py`: writing D and D' as image folders and summing them with the release's own
extraction (`tasks.custodian.shard_sums`), and loading the public images. The pieces here:

- neighbour construction: `add_remove_plan` / `replace_one_plan` say which public images (names,
  labels, hidden copies) make up D and D'; `replace_one_choice` picks the swap that moves the sums
  most under the claimed noise, from the features of the decoded images;
- the draws: `draw_scores` releases un-noised sums through `sums_to_noisy_parts` (the production
  lattice and scales; the noise from `audit_noise`, a fast sampler of nearly the same distribution) and
  reduces each release to the scores of a `ShiftTest`;
- the scoring: `audit_neighbours` runs the black-box bound (`audit_epsilon`), the white-box
  Gaussian-shift check (`gaussian_shift_check`) and the exact sensitivity check on the same draws,
  and, with `broken`, the same checks against `broken_mechanisms` to show their power;
- membership inference: `membership_game` (in/out game against releases) and
  `synthetic_membership_game` (nearest synthetic sample after a short training run), with their
  statistics in `membership_stats`.

Imports torch and `mepf_core.embedding` (the release's sums and noise) besides numpy: the audit
draws real releases, so it needs the release's types.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from mepf_core.embedding import FeatureSums, mean_embeddings, sums_to_noisy_parts
from mepf_core.errors import InvalidArgumentError
from mepf_core.features import images_to_features
from mepf_core.privacy.audit import (EpsilonBound, ShiftCheck, ShiftTest, audit_epsilon, clopper_pearson,
                                     clustered_bootstrap_auc, gaussian_auc, gaussian_shift_check, max_auc,
                                     roc_auc, tpr_at_fpr)
from mepf_core.privacy.mechanism import ReleaseMechanism, design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring

DEFAULT_DRAWS = 5000  # per dataset and mechanism: the whole audit takes about 40 s on 2 busy cores
WHITE_BOX_CONFIDENCE = 0.999  # a correct release fails the white-box check at most once in 1,000 audits
AUDIT_CLASSES = 2
BASE_SIZE = 16  # records of D; their number does not change the sums' sensitivity
REFERENCE_SIZE = 500  # public test images whose class means calibrate the membership attack
CANARY = "0000-canary.png"  # sorts first: a first-N window would push another record out
SENSITIVITY_TOLERANCE = 1e-9  # relative: float64 sums of a few records differ from exact by ~1e-15


# --- neighbour construction ----------------------------------------------------------------------

@dataclass(frozen=True, repr=False)
class Neighbours:
    """Un-noised sums of D and of its neighbour D' (computed by the release's extraction)."""

    base: FeatureSums
    neighbour: FeatureSums
    description: str


@dataclass(frozen=True, repr=False)
class FolderPlan:
    """One image folder to write: image i as class-LABEL/NAME_i, plus hidden copies of `hidden_copies`."""

    images: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...]
    hidden_copies: tuple[int, ...] = ()


@dataclass(frozen=True, repr=False)
class NeighbourPlan:
    """D and D' as folders to write, and what differs between them."""

    base: FolderPlan
    neighbour: FolderPlan
    description: str


def audit_labels(labels: torch.Tensor, *, labelled: bool) -> torch.Tensor:
    """Labels of the audit's records: `AUDIT_CLASSES` classes when labelled, one class otherwise."""
    return labels % AUDIT_CLASSES if labelled else torch.zeros_like(labels)


def record_names(base_size: int) -> tuple[str, ...]:
    """Names of D's records: 0001.png, 0002.png, ... (all sort after the canary)."""
    return tuple(f"{i + 1:04d}.png" for i in range(base_size))


def add_remove_plan(images: torch.Tensor, labels: torch.Tensor, base_size: int) -> NeighbourPlan:
    """D = the first `base_size` images; D' = D plus image `base_size`, the canary, which sorts first
    in its class and has a hidden copy in D' (a correct record selection ignores it).

    Every record with non-zero features moves each sum by exactly its norm bound and its class count
    by 1, so any canary attains the add-remove sensitivity."""
    names = record_names(base_size)
    return NeighbourPlan(FolderPlan(images[:base_size], labels[:base_size], names),
                         FolderPlan(images[:base_size + 1], labels[:base_size + 1], names + (CANARY,),
                                    hidden_copies=(base_size,)),
                         "add-remove: D plus one Fashion-MNIST test image")


def extreme_images(like: torch.Tensor) -> torch.Tensor:
    """Records an adversary would pick as the differing one: blank, saturated, checkerboard, inverted."""
    shape = like.shape[1:]
    checker = ((torch.arange(shape[-1])[None, :] + torch.arange(shape[-2])[:, None]) % 2).float()
    return torch.stack([torch.zeros(shape), torch.ones(shape), checker.expand(shape), 1.0 - like[0]])


def candidate_pool(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace-one candidates: the real images, then `extreme_images` (labels reused from the first ones)."""
    pool = torch.cat([images, extreme_images(images)])
    return pool, torch.cat([labels, labels[: len(pool) - len(images)]])


def replace_one_choice(phi: torch.Tensor, labels: torch.Tensor, base_size: int, sigma: Mapping[str, float],
                       labelled: bool) -> tuple[int, int, int]:
    """(record j of D, candidate index, its new label) maximising the claimed-noise shift of the sums.

    Shift^2 = |phi_new - phi_j|^2 / s1^2 (same class) or (|phi_new|^2 + |phi_j|^2) / s1^2 + 2 / sc^2
    (class changes). Computed from first-moment features: the second moment follows the same records.
    """
    s1, sc = sigma["moment1"], sigma.get("counts", 0.0)
    best, choice = -1.0, (0, base_size, int(labels[0]))
    for j, c in itertools.product(range(base_size), range(len(phi))):
        if c == j:
            continue
        for y in (range(AUDIT_CLASSES) if labelled else (int(labels[j]),)):
            if y == int(labels[j]):
                shift2 = float(((phi[c] - phi[j]) ** 2).sum()) / s1**2
            else:
                shift2 = float((phi[c] ** 2).sum() + (phi[j] ** 2).sum()) / s1**2 + (2 / sc**2 if sc > 0 else 0)
            if shift2 > best:
                best, choice = shift2, (j, c, y)
    return choice


def replace_one_plan(images: torch.Tensor, labels: torch.Tensor, base_size: int, *, pool: torch.Tensor,
                     pool_labels: torch.Tensor, pool_features: torch.Tensor, mechanism: ReleaseMechanism,
                     labelled: bool) -> NeighbourPlan:
    """D = the first `base_size` images; D' = D with record j replaced by the candidate (real or
    extreme image, any label) that moves the sums most, judged on `pool_features` (the first-moment
    features of the decoded pool). Real features are never exactly antipodal, so the 2C bound is not
    reached. The record that differs has a hidden copy in both folders."""
    sigma = {p.name: p.sigma for p in mechanism.parts}
    j, c, y = replace_one_choice(pool_features, pool_labels, base_size, sigma, labelled)
    base_images, base_labels = images[:base_size], labels[:base_size]
    swapped, swapped_labels = base_images.clone(), base_labels.clone()
    swapped[j], swapped_labels[j] = pool[c], y
    names = record_names(base_size)
    return NeighbourPlan(FolderPlan(base_images, base_labels, names, hidden_copies=(j,)),
                         FolderPlan(swapped, swapped_labels, names, hidden_copies=(j,)),
                         f"replace-one: record {j} of D replaced by candidate {c} with label {y}")


# --- the draws and the scoring -------------------------------------------------------------------

def validate_audit(draws: int, confidence: float, white_box_confidence: float, moments: int) -> None:
    """Refuse an audit's settings before any work starts (ValueError)."""
    if not (isinstance(draws, int) and not isinstance(draws, bool) and draws >= 100):
        raise InvalidArgumentError(f"draws must be an integer >= 100, got {draws!r}")
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise InvalidArgumentError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if not (isinstance(white_box_confidence, float) and 0 < white_box_confidence < 1):
        raise InvalidArgumentError(f"white_box_confidence must be a float in (0, 1), got {white_box_confidence!r}")
    if moments not in (1, 2):
        raise InvalidArgumentError(f"moments must be 1 or 2, got {moments!r}")


def audit_mechanism(*, target_epsilon: float, target_delta: float, relation: Neighbouring, labelled: bool,
                    moments: int, norm_bound: float, second_moment_bound: float, draws: int, confidence: float,
                    white_box_confidence: float) -> ReleaseMechanism:
    """Validate the audit's settings, then the mechanism under audit (the release's own calibration)."""
    validate_audit(draws, confidence, white_box_confidence, moments)
    return design_mechanism(target_epsilon=target_epsilon, target_delta=target_delta, relation=relation,
                            labelled=labelled, moments=moments, norm_bound=norm_bound,
                            second_moment_bound=second_moment_bound)


def broken_mechanisms(mechanism: ReleaseMechanism) -> dict[str, ReleaseMechanism]:
    """Deliberately wrong versions of `mechanism`, each a bug the audit must be able to catch.

    counts-unnoised: the class counts released exactly (the reference code's flaw); when the counts
    are exact legitimately, the first moment is left un-noised instead. sigma-halved: every
    sensitivity under-estimated by 2, so every sigma is half the calibrated one.
    """
    victim = "counts" if mechanism.part("counts").noised else "moment1"
    unnoised = tuple(replace(p, sensitivity=0.0) if p.name == victim else p for p in mechanism.parts)
    halved = tuple(replace(p, sensitivity=p.sensitivity / 2) for p in mechanism.parts)
    return {f"{victim}-unnoised": replace(mechanism, parts=unnoised),
            "sigma-halved": replace(mechanism, parts=halved)}


def shift_test(neighbours: Neighbours, mechanism: ReleaseMechanism) -> ShiftTest:
    """The Neyman-Pearson test of D against D' under the claimed noise."""
    base, other = neighbours.base.values(), neighbours.neighbour.values()
    return ShiftTest(base, {k: other[k] - base[k] for k in base}, {p.name: p.sigma for p in mechanism.parts})


_AUDIT_RNG = np.random.default_rng()  # fresh OS entropy per process; the audit's noise needs no secrecy


def audit_noise(shape: tuple[int, ...], *, scale: float) -> np.ndarray:
    """int64 round(N(0, scale^2)) of `shape` (numpy): the audit's stand-in for the production sampler.

    The audit draws thousands of releases of public images, and OpenDP's exact sampler costs about 10 us
    an entry (hours per audit); its distribution is tested on its own (tests/test_noise.py). Rounding a
    Gaussian and the discrete Gaussian both put mass ~ exp(-x^2 / (2 s^2)) on each integer, to a relative
    O(1 / s^2): total variation about 0.02 / s^2 an entry (1e-13 at the 2^18+ steps per sigma of the sums;
    1e-4 for counts at s ~ 13). Not cryptographically secure: never for a release.
    """
    return np.rint(_AUDIT_RNG.normal(scale=scale, size=shape)).astype(np.int64)


def draw_scores(sums: FeatureSums, mechanism: ReleaseMechanism, test: ShiftTest, draws: int) -> dict[str, np.ndarray]:
    """`draws` independent releases of `sums`, each reduced to the test's scores."""
    out = {name: np.empty(draws) for name in test.names}
    for i in range(draws):
        for name, value in test.scores(sums_to_noisy_parts(sums, mechanism, audit_noise)).items():
            out[name][i] = value
    return out


def audit_one(neighbours: Neighbours, drawn: ReleaseMechanism, test: ShiftTest, draws: int, *, claim: float,
              delta: float, confidence: float, white_box_confidence: float) -> tuple[EpsilonBound, ShiftCheck]:
    """Both checks on the same draws: (black-box bound, white-box shift check)."""
    null = draw_scores(neighbours.base, drawn, test, draws)
    alternative = draw_scores(neighbours.neighbour, drawn, test, draws)
    return (audit_epsilon(null, alternative, delta=delta, confidence=confidence),
            gaussian_shift_check(null, alternative, epsilon=claim, delta=delta, confidence=white_box_confidence))


def movement(neighbours: Neighbours, mechanism: ReleaseMechanism) -> dict[str, dict]:
    """How far each part's un-noised sums moved between D and D', against its claimed sensitivity."""
    base, other = neighbours.base.values(), neighbours.neighbour.values()
    out = {}
    for p in mechanism.parts:
        moved = float(np.linalg.norm(other[p.name] - base[p.name]))
        out[p.name] = {"moved": moved, "sensitivity": p.sensitivity,
                       "within": moved <= p.sensitivity * (1 + SENSITIVITY_TOLERANCE)}
    return out


def audit_neighbours(neighbours: Neighbours, mechanism: ReleaseMechanism, *, target_epsilon: float, labelled: bool,
                     moments: int, encoder: str, draws: int, confidence: float = 0.95, white_box_confidence: float = WHITE_BOX_CONFIDENCE,
                     broken: bool = True) -> dict:
    """The audit's report (public numbers only) from the neighbours' un-noised sums.

    PASS needs all three: the black-box lower bound does not exceed the claimed epsilon, the
    white-box interval of the Gaussian shift does not lie above the shift the claim allows, and no
    part of the un-noised sums moved between D and D' by more than its claimed sensitivity. The
    power check draws the same neighbours from each `broken_mechanisms` variant: a variant is
    caught when either statistical check refutes the claim.
    """
    test = shift_test(neighbours, mechanism)
    claim, delta = mechanism.epsilon, mechanism.target_delta
    checks = dict(claim=claim, delta=delta, confidence=confidence, white_box_confidence=white_box_confidence)
    bound, white = audit_one(neighbours, mechanism, test, draws, **checks)
    moved = movement(neighbours, mechanism)
    within = all(m["within"] for m in moved.values())
    report = {
        "claimed_epsilon": claim,
        "target_epsilon": target_epsilon,
        "delta": delta,
        "neighbouring": mechanism.relation.value,
        "labelled": labelled,
        "moments": moments,
        "encoder": encoder,
        "feature_dim": neighbours.base.moment1.shape[1],
        "neighbours": neighbours.description,
        "draws": draws,
        "shift": test.joint_shift,  # in noise standard deviations; 1 / z for worst-case neighbours
        "shift_bound": 1.0 / mechanism.effective_noise_multiplier,
        "movement": moved,
        "within_sensitivity": within,
        "empirical_epsilon_lower_bound": bound.lower,
        "ci": [bound.lower, bound.upper],
        "confidence": confidence,
        "bound": bound.as_dict(),
        "black_box_pass": bound.lower <= claim,
        "white_box": white.as_dict(),
        "pass": bound.lower <= claim and white.passed and within,
    }
    if broken:
        rows = []
        for bug, drawn in broken_mechanisms(mechanism).items():
            b, w = audit_one(neighbours, drawn, test, draws, **checks)
            rows.append({"bug": bug, "lower_bound": b.lower, "ci": [b.lower, b.upper], "test": b.test,
                         "caught_black_box": b.lower > claim, "white_box": w.as_dict(),
                         "caught_white_box": not w.passed, "caught": b.lower > claim or not w.passed})
        report["broken_releases"] = rows
        report["broken_release_lower_bound"] = rows[0]["lower_bound"]
        report["power_shown"] = all(r["caught"] for r in rows)
    return report


# --- membership inference ------------------------------------------------------------------------

def in_memory_sums(feature_map, images: torch.Tensor, labels: torch.Tensor, *, classes: int) -> FeatureSums:
    """First-moment sums (norm bound 1) of tensors already in memory, for the membership games.

    Not the release's extraction (that is `tasks.audit.folder_sums`, which the epsilon audit uses):
    these games measure what an attacker learns from mean embeddings, and a missing class would
    change the class count of an image folder.
    """
    sums = FeatureSums.zeros(classes, feature_map.feature_dim, 1, norm_bound=1.0)
    for lo in range(0, len(images), 64):
        phi1, _ = images_to_features(feature_map, images[lo:lo + 64], norm_bound=1.0)
        sums.add(phi1, None, labels[lo:lo + 64])
    return sums


def membership_stats(positives: np.ndarray, negatives: np.ndarray, *, fpr: float, confidence: float,
                     rng: np.random.Generator, epsilon: float, delta: float) -> dict:
    """AUC (bootstrap over the tables' shared rows and each table's columns), TPR at `fpr`
    (Clopper-Pearson), and the largest AUC and TPR (at the realised FPR's upper bound) that an
    (epsilon, delta)-DP mechanism allows in the game that produced the tables."""
    tp, n1, fp, n0 = tpr_at_fpr(positives, negatives, fpr=fpr)
    tpr_lo, tpr_hi = clopper_pearson(tp, n1, confidence=confidence)
    fpr_lo, fpr_hi = clopper_pearson(fp, n0, confidence=confidence)
    return {
        "scores": [int(positives.size), int(negatives.size)],
        "auc": roc_auc(positives, negatives),
        "auc_ci": list(clustered_bootstrap_auc(positives, negatives, rng=rng, confidence=confidence)),
        "auc_max_for_claim": max_auc(epsilon, delta),
        "fpr_target": fpr,
        "tpr": tp / n1,
        "tpr_ci": [float(tpr_lo), float(tpr_hi)],
        "fpr": fp / n0,
        "fpr_ci": [float(fpr_lo), float(fpr_hi)],
        "tpr_max_for_claim": min(1.0, math.exp(epsilon) * float(fpr_hi) + delta),
    }


def _labelled_mechanism(target_epsilon: float, target_delta: float) -> ReleaseMechanism:
    return design_mechanism(target_epsilon=target_epsilon, target_delta=target_delta,
                            relation=Neighbouring.ADD_REMOVE, labelled=True, moments=1,
                            norm_bound=1.0, second_moment_bound=1.0)


def membership_game(feature_map, images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
                    ref_labels: torch.Tensor, *, classes: int, base: int, candidates: int, releases_in: int,
                    releases_out: int, target_epsilon: float, target_delta: float, fpr: float, confidence: float,
                    seed: int) -> dict:
    """The in/out membership game on in-memory images (see `tasks.audit.membership_inference`).

    `images[:base]` is B, `images[base:base + candidates]` the candidates; `ref_*` are public images
    whose class means cancel how typical a candidate is. Every candidate gives `releases_in` in-scores
    and shares the `releases_out` out-releases; "control" plays the game against un-noised means.
    """
    fm, k = feature_map, classes
    mechanism = _labelled_mechanism(target_epsilon, target_delta)
    phi = torch.cat([images_to_features(fm, images[lo:lo + 64], norm_bound=1.0)[0]
                     for lo in range(0, len(images), 64)])
    sums_out = FeatureSums.zeros(k, fm.feature_dim, 1, norm_bound=1.0)
    sums_out.add(phi[:base], None, labels[:base])
    reference = mean_embeddings(in_memory_sums(fm, ref_images, ref_labels, classes=k).values())["moment1"]
    cand, rows = phi[base:].numpy(), labels[base:].numpy()
    typicality = ((cand - reference[rows]) ** 2).sum(1)

    def scores(release: dict[str, np.ndarray], which: slice | int = slice(None)) -> np.ndarray:
        means = mean_embeddings(release)["moment1"][rows[which]]
        return typicality[which] - ((cand[which] - means) ** 2).sum(-1)

    def with_candidate(c: int) -> FeatureSums:  # B plus x, merged as the custodian's reduce step does
        one = FeatureSums.zeros(k, fm.feature_dim, 1, norm_bound=1.0)
        one.add(phi[base + c:base + c + 1], None, labels[base + c:base + c + 1])
        return sums_out.merge(one)

    out_scores = np.stack([scores(sums_to_noisy_parts(sums_out, mechanism, audit_noise)) for _ in range(releases_out)], axis=1)
    in_scores, in_clean = np.empty((candidates, releases_in)), np.empty((candidates, 1))
    for c in range(candidates):
        sums_in = with_candidate(c)
        in_scores[c] = [scores(sums_to_noisy_parts(sums_in, mechanism, audit_noise), c) for _ in range(releases_in)]
        in_clean[c] = scores(sums_in.values(), c)
    rng = np.random.default_rng(seed)
    stats = dict(fpr=fpr, confidence=confidence, epsilon=mechanism.epsilon, delta=target_delta)
    return {
        "epsilon": mechanism.epsilon,
        "delta": target_delta,
        "base": base,
        "candidates": candidates,
        "releases": {"in": releases_in, "out": releases_out},
        "auc_optimal_gaussian": gaussian_auc(1.0 / mechanism.effective_noise_multiplier),  # vs this mechanism
        "attack": membership_stats(in_scores, out_scores, rng=rng, **stats),
        "control": membership_stats(in_clean, scores(sums_out.values())[:, None], rng=rng, **stats),
    }


def synthetic_membership_game(feature_map, images: torch.Tensor, labels: torch.Tensor, *, classes: int,
                              image_shape: tuple[int, ...], members: int, target_epsilon: float,
                              target_delta: float, steps: int, batch_size: int, samples: int, fpr: float,
                              confidence: float, seed: int) -> dict:
    """Nearest-synthetic-sample game on 2 x `members` in-memory images (see
    `tasks.audit.synthetic_membership_inference`): seeded split, one release of the members, a short
    `Trainer` run, `samples` class-balanced synthetic images, pixel-space distance scores."""
    from mepf_core.public_map import PublicFeatureMap
    from mepf_core.training import TrainConfig, Trainer, balanced_labels, generate

    fm = feature_map
    order = torch.from_numpy(np.random.default_rng(seed).permutation(2 * members))
    images, labels = images[order], labels[order]  # members first, then non-members
    mechanism = _labelled_mechanism(target_epsilon, target_delta)
    sums = in_memory_sums(fm, images[:members], labels[:members], classes=classes)
    targets = mean_embeddings(sums_to_noisy_parts(sums, mechanism))
    config = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=steps, eval_samples=100, device="cpu",
                         seed=seed)
    public_map = PublicFeatureMap(fm, norm_bound=1.0, second_moment_bound=None, moments=1)
    trainer = Trainer(config, public_map, targets, image_shape=image_shape, labelled=True)
    trainer.train(progress=False)
    synthetic = generate(trainer.generator, balanced_labels(samples, classes), seed=seed + 1)
    score = -torch.cdist(images.flatten(1).double(), synthetic.flatten(1).double()).min(dim=1).values.numpy()
    eps = mechanism.epsilon
    return {
        "epsilon": eps,
        "delta": target_delta,
        "members": members,
        "steps": steps,
        "samples": samples,
        "attack": membership_stats(score[None, :members], score[None, members:], fpr=fpr, confidence=confidence,
                                   rng=np.random.default_rng(seed), epsilon=2 * eps,
                                   delta=(1 + math.exp(eps)) * target_delta),
    }
