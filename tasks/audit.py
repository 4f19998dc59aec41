"""Audit runner: many real releases of two worst-case neighbouring datasets, through the production path.

D and D' are written as image folders (`imagefolder:PATH`, one subfolder per class) and their sums
come from `tasks.custodian.shard_sums`, the release's own extraction (record selection by
`open_dataset`, bounded features, float64 per-class sums): a record-selection fault (a hidden copy
counted, a window that pushes a record out) moves the audited sums as it moves a release's. The
mechanism comes from `design_mechanism` (autodp calibration) and every release from
`sums_to_noisy_parts` (os.urandom noise). Only the data are small: public Fashion-MNIST test images
stand in for the private set, and labelled audits use two classes, because noise on rows that the
differing record cannot touch changes nothing in the test and costs os.urandom time per draw.

Two checks read the same draws: the black-box epsilon lower bound (`audit_epsilon`) and the
white-box Gaussian-shift check (`gaussian_shift_check`); a third, exact one compares how far the
un-noised sums of D and D' are apart with the claimed sensitivities.

Not a Prefect task: nothing private is read, and Prefect's start-up would cost more than the draws.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from flows.release_params import ReleaseParams
from mepf_core.embedding import FeatureSums, mean_embeddings, sums_to_noisy_parts
from mepf_core.encoders import FeatureMap, build_feature_map
from mepf_core.features import images_to_features
from mepf_core.privacy.audit import (ShiftTest, audit_epsilon, clopper_pearson, clustered_bootstrap_auc,
                                     gaussian_auc, gaussian_shift_check, max_auc, roc_auc, tpr_at_fpr)
from mepf_core.privacy.mechanism import ReleaseMechanism, design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.datasets import open_dataset

DEFAULT_DRAWS = 5000  # per dataset and mechanism: the whole audit takes about 40 s on 2 busy cores
WHITE_BOX_CONFIDENCE = 0.999  # a correct release fails the white-box check at most once in 1,000 audits
AUDIT_CLASSES = 2
BASE_SIZE = 16  # records of D; their number does not change the sums' sensitivity
REFERENCE_SIZE = 500  # public test images whose class means calibrate the membership attack
CANARY = "0000-canary.png"  # sorts first: a first-N window would push another record out
SENSITIVITY_TOLERANCE = 1e-9  # relative: float64 sums of a few records differ from exact by ~1e-15


@dataclass(frozen=True, repr=False)
class Neighbours:
    """Un-noised sums of D and of its neighbour D' (computed by the release's extraction)."""

    base: FeatureSums
    neighbour: FeatureSums
    description: str


def public_images(n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first n Fashion-MNIST images of a public split, in [0, 1], with their labels."""
    images, labels = next(open_dataset("fashion-mnist", split).iter_batches(n))
    return images, labels


def _save_png(image: torch.Tensor, path: Path) -> None:
    """One C x H x W image in [0, 1] as an 8-bit PNG (grey for C = 1); public images are 8-bit, so exact."""
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(path)


def write_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, names: list[str], *,
                       hidden_copies: tuple[int, ...] = ()) -> str:
    """An `imagefolder:` dataset at `root`: image i as class-LABEL/NAME_i; returns its spec.

    Every index in `hidden_copies` also gets a copy where Jupyter leaves one,
    class-LABEL/.ipynb_checkpoints/NAME-checkpoint.png: hidden files are never records, so a correct
    record selection ignores it, and one that counts it moves the sums by twice the record.
    """
    if not (len(images) == len(labels) == len(names)):
        raise ValueError(f"need one label and one name per image, got {len(images)}, {len(labels)}, {len(names)}")
    for image, label, name in zip(images, labels, names):
        _save_png(image, root / f"class-{int(label)}" / name)
    for i in hidden_copies:
        stem = Path(names[i]).stem
        _save_png(images[i], root / f"class-{int(labels[i])}" / ".ipynb_checkpoints" / f"{stem}-checkpoint.png")
    return f"imagefolder:{root}"


def extraction_params(dataset: str, mechanism: ReleaseMechanism, *, labelled: bool, moments: int,
                      norm_bound: float, second_moment_bound: float, encoder: str) -> ReleaseParams:
    """The release settings whose extraction the audit runs (what `mepf release` would be given)."""
    return ReleaseParams(dataset=dataset, target_epsilon=mechanism.target_epsilon,
                         target_delta=mechanism.target_delta, labelled=labelled, moments=moments, encoder=encoder,
                         norm_bound=norm_bound, second_moment_bound=second_moment_bound,
                         neighbouring=mechanism.relation)


def folder_sums(params: ReleaseParams) -> FeatureSums:
    """Un-noised sums of an image folder by the release's own extraction (one shard: the whole set)."""
    from tasks.custodian import shard_sums  # imports Prefect: only when sums are needed

    if params.shards != 1:
        raise ValueError(f"the audit extracts one shard, got shards={params.shards}")
    return shard_sums(params, 0)


def _extreme_images(like: torch.Tensor) -> torch.Tensor:
    """Records an adversary would pick as the differing one: blank, saturated, checkerboard, inverted."""
    shape = like.shape[1:]
    checker = ((torch.arange(shape[-1])[None, :] + torch.arange(shape[-2])[:, None]) % 2).float()
    return torch.stack([torch.zeros(shape), torch.ones(shape), checker.expand(shape), 1.0 - like[0]])


def _replace_one_choice(phi: torch.Tensor, labels: torch.Tensor, base_size: int, sigma: dict[str, float],
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


def _decoded_features(folder: Path, pool: torch.Tensor, feature_map: FeatureMap, norm_bound: float) -> torch.Tensor:
    """First-moment features of `pool` as the release sees the images: written as PNGs, decoded by
    `open_dataset("imagefolder:...")` (names sort in pool order), bounded by `images_to_features`."""
    names = [f"{i:04d}.png" for i in range(len(pool))]
    source = open_dataset(write_image_folder(folder, pool, torch.zeros(len(pool), dtype=torch.int64), names))
    return torch.cat([images_to_features(feature_map, x, norm_bound=norm_bound)[0]
                      for x, _ in source.iter_batches(64)])


def neighbouring_sums(mechanism: ReleaseMechanism, *, labelled: bool, moments: int, norm_bound: float,
                      second_moment_bound: float, encoder: str = "efficientnet-lite0",
                      base_size: int = BASE_SIZE) -> Neighbours:
    """Worst-case neighbours under the mechanism's relation, extracted as a release would extract them.

    add-remove: D' = D plus one real record (the canary, named to sort first in its class); every
    record with non-zero features moves each sum by exactly its norm bound and its class count by
    1, so any canary attains the sensitivity. replace-one: record j of D is replaced by the
    candidate (real or extreme image, any label) that moves the sums most, judged on the features
    of the decoded images; real features are never exactly antipodal, so the 2C bound is not
    reached. The records that differ also have hidden copies in their folders (`write_image_folder`).
    """
    images, labels = public_images(base_size + 1)
    labels = labels % AUDIT_CLASSES if labelled else torch.zeros_like(labels)
    base_images, base_labels = images[:base_size], labels[:base_size]
    names = [f"{i + 1:04d}.png" for i in range(base_size)]
    settings = dict(labelled=labelled, moments=moments, norm_bound=norm_bound,
                    second_moment_bound=second_moment_bound, encoder=encoder)
    with tempfile.TemporaryDirectory(prefix="mepf-audit-") as tmp:
        tmp = Path(tmp)
        if mechanism.relation is Neighbouring.ADD_REMOVE:
            d = write_image_folder(tmp / "D", base_images, base_labels, names)
            d_prime = write_image_folder(tmp / "D-prime", images, labels, names + [CANARY],
                                         hidden_copies=(base_size,))
            description = "add-remove: D plus one Fashion-MNIST test image"
        else:
            pool = torch.cat([images, _extreme_images(images)])
            pool_labels = torch.cat([labels, labels[: len(pool) - len(images)]])
            phi = _decoded_features(tmp / "pool", pool, build_feature_map(encoder), norm_bound)
            sigma = {p.name: p.sigma for p in mechanism.parts}
            j, c, y = _replace_one_choice(phi, pool_labels, base_size, sigma, labelled)
            swapped, swapped_labels = base_images.clone(), base_labels.clone()
            swapped[j], swapped_labels[j] = pool[c], y
            d = write_image_folder(tmp / "D", base_images, base_labels, names, hidden_copies=(j,))
            d_prime = write_image_folder(tmp / "D-prime", swapped, swapped_labels, names, hidden_copies=(j,))
            description = f"replace-one: record {j} of D replaced by candidate {c} with label {y}"
        base = folder_sums(extraction_params(d, mechanism, **settings))
        neighbour = folder_sums(extraction_params(d_prime, mechanism, **settings))
    return Neighbours(base, neighbour, description)


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


def draw_scores(sums: FeatureSums, mechanism: ReleaseMechanism, test: ShiftTest, draws: int) -> dict[str, np.ndarray]:
    """`draws` independent releases of `sums`, each reduced to the test's scores."""
    out = {name: np.empty(draws) for name in test.names}
    for i in range(draws):
        for name, value in test.scores(sums_to_noisy_parts(sums, mechanism)).items():
            out[name][i] = value
    return out


def _audit_one(neighbours: Neighbours, drawn: ReleaseMechanism, test: ShiftTest, draws: int, *, claim: float,
               delta: float, confidence: float, white_box_confidence: float):
    """Both checks on the same draws: (black-box bound, white-box shift check)."""
    null = draw_scores(neighbours.base, drawn, test, draws)
    alternative = draw_scores(neighbours.neighbour, drawn, test, draws)
    return (audit_epsilon(null, alternative, delta=delta, confidence=confidence),
            gaussian_shift_check(null, alternative, epsilon=claim, delta=delta, confidence=white_box_confidence))


def _validate_run(draws: int, confidence: float, white_box_confidence: float, moments: int) -> None:
    if not (isinstance(draws, int) and not isinstance(draws, bool) and draws >= 100):
        raise ValueError(f"draws must be an integer >= 100, got {draws!r}")
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence must be a float in (0, 1), got {confidence!r}")
    if not (isinstance(white_box_confidence, float) and 0 < white_box_confidence < 1):
        raise ValueError(f"white_box_confidence must be a float in (0, 1), got {white_box_confidence!r}")
    if moments not in (1, 2):
        raise ValueError(f"moments must be 1 or 2, got {moments!r}")


def _movement(neighbours: Neighbours, mechanism: ReleaseMechanism) -> dict[str, dict]:
    """How far each part's un-noised sums moved between D and D', against its claimed sensitivity."""
    base, other = neighbours.base.parts(), neighbours.neighbour.parts()
    out = {}
    for p in mechanism.parts:
        moved = float(np.linalg.norm(other[p.name] - base[p.name]))
        out[p.name] = {"moved": moved, "sensitivity": p.sensitivity,
                       "within": moved <= p.sensitivity * (1 + SENSITIVITY_TOLERANCE)}
    return out


def run_audit(*, target_epsilon: float = 1.0, target_delta: float = 1e-5, draws: int = DEFAULT_DRAWS,
              relation: Neighbouring = Neighbouring.ADD_REMOVE, labelled: bool = False, moments: int = 1,
              norm_bound: float = 1.0, second_moment_bound: float = 1.0, confidence: float = 0.95,
              white_box_confidence: float = WHITE_BOX_CONFIDENCE, broken: bool = True,
              encoder: str = "efficientnet-lite0") -> dict:
    """Audit the claimed epsilon of the production release path; with `broken`, show the checks' power.

    PASS needs all three: the black-box lower bound does not exceed the claimed epsilon, the
    white-box interval of the Gaussian shift does not lie above the shift the claim allows, and no
    part of the un-noised sums moved between D and D' by more than its claimed sensitivity. The
    power check draws the same neighbours from each `broken_mechanisms` variant: a variant is
    caught when either statistical check refutes the claim.
    """
    _validate_run(draws, confidence, white_box_confidence, moments)
    started = time.perf_counter()
    mechanism = design_mechanism(target_epsilon=target_epsilon, target_delta=target_delta, relation=relation,
                                 labelled=labelled, moments=moments, norm_bound=norm_bound,
                                 second_moment_bound=second_moment_bound)
    neighbours = neighbouring_sums(mechanism, labelled=labelled, moments=moments, norm_bound=norm_bound,
                                   second_moment_bound=second_moment_bound, encoder=encoder)
    feature_dim = neighbours.base.moment1.shape[1]
    base, other = neighbours.base.parts(), neighbours.neighbour.parts()
    test = ShiftTest(base, {k: other[k] - base[k] for k in base}, {p.name: p.sigma for p in mechanism.parts})
    claim = mechanism.epsilon
    checks = dict(claim=claim, delta=target_delta, confidence=confidence, white_box_confidence=white_box_confidence)
    bound, white = _audit_one(neighbours, mechanism, test, draws, **checks)
    movement = _movement(neighbours, mechanism)
    within = all(m["within"] for m in movement.values())
    report = {
        "claimed_epsilon": claim,
        "target_epsilon": target_epsilon,
        "delta": target_delta,
        "neighbouring": relation.value,
        "labelled": labelled,
        "moments": moments,
        "encoder": encoder,
        "feature_dim": feature_dim,
        "neighbours": neighbours.description,
        "draws": draws,
        "shift": test.joint_shift,  # in noise standard deviations; 1 / z for worst-case neighbours
        "shift_bound": 1.0 / mechanism.effective_noise_multiplier,
        "movement": movement,
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
            b, w = _audit_one(neighbours, drawn, test, draws, **checks)
            rows.append({"bug": bug, "lower_bound": b.lower, "ci": [b.lower, b.upper], "test": b.test,
                         "caught_black_box": b.lower > claim, "white_box": w.as_dict(),
                         "caught_white_box": not w.passed, "caught": b.lower > claim or not w.passed})
        report["broken_releases"] = rows
        report["broken_release_lower_bound"] = rows[0]["lower_bound"]
        report["power_shown"] = all(r["caught"] for r in rows)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# --- membership inference ----------------------------------------------------------------------

def _in_memory_sums(feature_map: FeatureMap, images: torch.Tensor, labels: torch.Tensor, *,
                    classes: int) -> FeatureSums:
    """First-moment sums (norm bound 1) of tensors already in memory, for the membership games.

    Not the release's extraction (that is `folder_sums`, which the epsilon audit uses): these games
    measure what an attacker learns from mean embeddings, and a missing class would change the
    class count of an image folder.
    """
    sums = FeatureSums.zeros(classes, feature_map.feature_dim, 1)
    for lo in range(0, len(images), 64):
        phi1, _ = images_to_features(feature_map, images[lo:lo + 64], norm_bound=1.0)
        sums.add(phi1, None, labels[lo:lo + 64])
    return sums


def _membership_stats(positives: np.ndarray, negatives: np.ndarray, *, fpr: float, confidence: float,
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


def membership_inference(*, base: int = 100, candidates: int = 100, releases_in: int = 2, releases_out: int = 20,
                         target_epsilon: float = 1.0, target_delta: float = 1e-5, fpr: float = 1e-3,
                         confidence: float = 0.95, seed: int = 0, feature_map: FeatureMap | None = None) -> dict:
    """The in/out membership game, the one DP speaks about, against labelled releases.

    B is `base` Fashion-MNIST training images; each of `candidates` further images x is scored
    against `releases_in` releases of B plus x ("in") and `releases_out` shared releases of B
    ("out"), all drawn through the production path (10 classes, first moment, add-remove). Every
    candidate gives equally many in and out scores, so the pooled ROC curve is the average of the
    candidates' curves; each of those lies under the (epsilon, delta) trade-off lines, which are
    linear, so the pooled curve, its AUC and its TPR do too.

    The attack is distance-based: x scores high when its bounded features are closer to its class's
    released mean embedding than to the mean of public test images of that class (the reference
    cancels how typical the image is). "control" plays the same game against un-noised means.
    """
    if base < 10 or candidates < 10 or releases_in < 1 or releases_out < 2:
        raise ValueError(f"need base, candidates >= 10, releases_in >= 1, releases_out >= 2, got "
                         f"{base}, {candidates}, {releases_in}, {releases_out}")
    fm = feature_map if feature_map is not None else build_feature_map("efficientnet-lite0")
    source = open_dataset("fashion-mnist", "train")
    images, labels = next(source.iter_batches(base + candidates))
    ref_images, ref_labels = next(open_dataset("fashion-mnist", "test").iter_batches(REFERENCE_SIZE))
    k = source.num_classes
    mechanism = design_mechanism(target_epsilon=target_epsilon, target_delta=target_delta,
                                 relation=Neighbouring.ADD_REMOVE, labelled=True, moments=1,
                                 norm_bound=1.0, second_moment_bound=1.0)
    phi = torch.cat([images_to_features(fm, images[lo:lo + 64], norm_bound=1.0)[0]
                     for lo in range(0, len(images), 64)])
    sums_out = FeatureSums.zeros(k, fm.feature_dim, 1)
    sums_out.add(phi[:base], None, labels[:base])
    reference = mean_embeddings(_in_memory_sums(fm, ref_images, ref_labels, classes=k).parts())["moment1"]
    cand, rows = phi[base:].numpy(), labels[base:].numpy()
    typicality = ((cand - reference[rows]) ** 2).sum(1)

    def scores(release: dict[str, np.ndarray], which: slice | int = slice(None)) -> np.ndarray:
        means = mean_embeddings(release)["moment1"][rows[which]]
        return typicality[which] - ((cand[which] - means) ** 2).sum(-1)

    def with_candidate(c: int) -> FeatureSums:  # B plus x, merged as the custodian's reduce step does
        one = FeatureSums.zeros(k, fm.feature_dim, 1)
        one.add(phi[base + c:base + c + 1], None, labels[base + c:base + c + 1])
        return sums_out.merge(one)

    out_scores = np.stack([scores(sums_to_noisy_parts(sums_out, mechanism)) for _ in range(releases_out)], axis=1)
    in_scores, in_clean = np.empty((candidates, releases_in)), np.empty((candidates, 1))
    for c in range(candidates):
        sums_in = with_candidate(c)
        in_scores[c] = [scores(sums_to_noisy_parts(sums_in, mechanism), c) for _ in range(releases_in)]
        in_clean[c] = scores(sums_in.parts(), c)
    rng = np.random.default_rng(seed)
    stats = dict(fpr=fpr, confidence=confidence, epsilon=mechanism.epsilon, delta=target_delta)
    return {
        "epsilon": mechanism.epsilon,
        "delta": target_delta,
        "base": base,
        "candidates": candidates,
        "releases": {"in": releases_in, "out": releases_out},
        "auc_optimal_gaussian": gaussian_auc(1.0 / mechanism.effective_noise_multiplier),  # vs this mechanism
        "attack": _membership_stats(in_scores, out_scores, rng=rng, **stats),
        "control": _membership_stats(in_clean, scores(sums_out.parts())[:, None], rng=rng, **stats),
    }


def synthetic_membership_inference(*, members: int = 100, target_epsilon: float = 1.0, target_delta: float = 1e-5,
                                   steps: int = 100, batch_size: int = 100, samples: int = 1000, fpr: float = 1e-3,
                                   confidence: float = 0.95, seed: int = 0,
                                   feature_map: FeatureMap | None = None) -> dict:
    """Distance-to-nearest-synthetic-sample attack on a generator trained (briefly) on a release.

    2 x `members` Fashion-MNIST training images are split at random (seeded) into members and
    non-members; one release of the members at `target_epsilon`, a public-stage `Trainer` run of
    `steps` steps on its mean embeddings, then `samples` class-balanced synthetic images. A
    candidate scores high when a synthetic image is close to it in pixel space (the attack on
    generators that memorise). One run only, so members and non-members are different images: by
    exchangeability, P(member outscores non-member) is the chance a test tells apart two datasets
    that swap one record, which group privacy bounds with (2 epsilon, (1 + e^epsilon) delta).
    """
    from mepf_core.public_map import PublicFeatureMap
    from mepf_core.training import TrainConfig, Trainer, balanced_labels, generate

    if members < 10 or steps < 1 or samples < 10:
        raise ValueError(f"need members >= 10, steps >= 1, samples >= 10, got {members}, {steps}, {samples}")
    fm = feature_map if feature_map is not None else build_feature_map("efficientnet-lite0")
    source = open_dataset("fashion-mnist", "train")
    images, labels = next(source.iter_batches(2 * members))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(2 * members))
    images, labels = images[order], labels[order]  # members first, then non-members
    mechanism = design_mechanism(target_epsilon=target_epsilon, target_delta=target_delta,
                                 relation=Neighbouring.ADD_REMOVE, labelled=True, moments=1,
                                 norm_bound=1.0, second_moment_bound=1.0)
    sums = _in_memory_sums(fm, images[:members], labels[:members], classes=source.num_classes)
    targets = mean_embeddings(sums_to_noisy_parts(sums, mechanism))
    config = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=steps, eval_samples=100, device="cpu",
                         seed=seed)
    public_map = PublicFeatureMap(fm, norm_bound=1.0, second_moment_bound=None, moments=1)
    trainer = Trainer(config, public_map, targets, image_shape=source.image_shape, labelled=True)
    trainer.train(progress=False)
    synthetic = generate(trainer.generator, balanced_labels(samples, source.num_classes), seed=seed + 1)
    score = -torch.cdist(images.flatten(1).double(), synthetic.flatten(1).double()).min(dim=1).values.numpy()
    eps = mechanism.epsilon
    return {
        "epsilon": eps,
        "delta": target_delta,
        "members": members,
        "steps": steps,
        "samples": samples,
        "attack": _membership_stats(score[None, :members], score[None, members:], fpr=fpr, confidence=confidence,
                                    rng=np.random.default_rng(seed), epsilon=2 * eps,
                                    delta=(1 + math.exp(eps)) * target_delta),
    }
