"""Audit I/O and its Prefect tasks: D and D' as image folders, summed by the release's own extraction.

The maths (neighbour choice, draws, both checks, membership games) is `mepf_core.privacy.audit_run`.
What needs files or datasets is here: the public Fashion-MNIST test images that stand in for the
private set, D and D' written as image folders (`imagefolder:PATH`, one subfolder per class, with
hidden Jupyter copies of the differing record), and their un-noised sums from
`tasks.custodian.shard_sums`, the release's own extraction (record selection by `open_dataset`,
bounded features, float64 per-class sums): a record-selection fault (a hidden copy counted, a window
that pushes a record out) moves the audited sums as it moves a release's. Calling another task
module's plain function is allowed (DESIGN section 3); `shard_sums` takes a `ReleaseParams`
(`storage.params`).

Two entry points compose the same functions:
- `run_audit`: plain Python, no Prefect run. `mepf audit` calls it: the default audit takes about
  40 s, and an ephemeral Prefect server adds 10-25 s (measured: the flow at 500 draws took 29.5 s
  end to end against 5.1 s of audit work).
- `flows.audit.privacy_audit`: the `privacy-audit` flow of the tasks below, for deployments and the
  Prefect UI; `publish_audit` puts the public numbers in a markdown artifact.

Tasks that hold un-noised sums (`extract_neighbours`, `audit_draws`) never persist or cache them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mepf_core.encoders import FeatureMap, build_feature_map
from mepf_core.features import images_to_features
from mepf_core.privacy.audit_run import (BASE_SIZE, CANARY, DEFAULT_DRAWS, REFERENCE_SIZE,  # noqa: F401 - public names
                                         WHITE_BOX_CONFIDENCE, FolderPlan, Neighbours, add_remove_plan,
                                         audit_labels, audit_mechanism, audit_neighbours, broken_mechanisms,
                                         candidate_pool, draw_scores, membership_game, replace_one_plan,
                                         synthetic_membership_game)
from mepf_core.privacy.mechanism import ReleaseMechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.datasets import open_dataset
from storage.params import ReleaseParams
from tasks.custodian import shard_sums

_PRIVATE = dict(persist_result=False, cache_policy=NO_CACHE)  # un-noised sums: never stored, never cached


# --- files and datasets --------------------------------------------------------------------------

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


def write_folder_plan(root: Path, plan: FolderPlan) -> str:
    """Write one folder of a `NeighbourPlan`; returns its `imagefolder:` spec."""
    return write_image_folder(root, plan.images, plan.labels, list(plan.names), hidden_copies=plan.hidden_copies)


def extraction_params(dataset: str, mechanism: ReleaseMechanism, *, labelled: bool, moments: int,
                      norm_bound: float, second_moment_bound: float, encoder: str) -> ReleaseParams:
    """The release settings whose extraction the audit runs (what `mepf release` would be given)."""
    return ReleaseParams(dataset=dataset, target_epsilon=mechanism.target_epsilon,
                         target_delta=mechanism.target_delta, labelled=labelled, moments=moments, encoder=encoder,
                         norm_bound=norm_bound, second_moment_bound=second_moment_bound,
                         neighbouring=mechanism.relation)


def folder_sums(params: ReleaseParams):
    """Un-noised sums of an image folder by the release's own extraction (one shard: the whole set)."""
    if params.shards != 1:
        raise ValueError(f"the audit extracts one shard, got shards={params.shards}")
    return shard_sums(params, 0)


def decoded_features(folder: Path, pool: torch.Tensor, feature_map: FeatureMap, norm_bound: float) -> torch.Tensor:
    """First-moment features of `pool` as the release sees the images: written as PNGs, decoded by
    `open_dataset("imagefolder:...")` (names sort in pool order), bounded by `images_to_features`."""
    names = [f"{i:04d}.png" for i in range(len(pool))]
    source = open_dataset(write_image_folder(folder, pool, torch.zeros(len(pool), dtype=torch.int64), names))
    return torch.cat([images_to_features(feature_map, x, norm_bound=norm_bound)[0]
                      for x, _ in source.iter_batches(64)])


def neighbouring_sums(mechanism: ReleaseMechanism, *, labelled: bool, moments: int, norm_bound: float,
                      second_moment_bound: float, encoder: str = "efficientnet-lite0",
                      base_size: int = BASE_SIZE) -> Neighbours:
    """Worst-case neighbours under the mechanism's relation (`add_remove_plan` / `replace_one_plan`),
    written to a temporary folder and extracted as a release would extract them."""
    images, labels = public_images(base_size + 1)
    labels = audit_labels(labels, labelled=labelled)
    settings = dict(labelled=labelled, moments=moments, norm_bound=norm_bound,
                    second_moment_bound=second_moment_bound, encoder=encoder)
    with tempfile.TemporaryDirectory(prefix="mepf-audit-") as tmp:
        tmp = Path(tmp)
        if mechanism.relation is Neighbouring.ADD_REMOVE:
            plan = add_remove_plan(images, labels, base_size)
        else:
            pool, pool_labels = candidate_pool(images, labels)
            phi = decoded_features(tmp / "pool", pool, build_feature_map(encoder), norm_bound)
            plan = replace_one_plan(images, labels, base_size, pool=pool, pool_labels=pool_labels,
                                    pool_features=phi, mechanism=mechanism, labelled=labelled)
        d = write_folder_plan(tmp / "D", plan.base)
        d_prime = write_folder_plan(tmp / "D-prime", plan.neighbour)
        base = folder_sums(extraction_params(d, mechanism, **settings))
        neighbour = folder_sums(extraction_params(d_prime, mechanism, **settings))
    return Neighbours(base, neighbour, plan.description)


def run_audit(*, target_epsilon: float = 1.0, target_delta: float = 1e-5, draws: int = DEFAULT_DRAWS,
              relation: Neighbouring = Neighbouring.ADD_REMOVE, labelled: bool = False, moments: int = 1,
              norm_bound: float = 1.0, second_moment_bound: float = 1.0, confidence: float = 0.95,
              white_box_confidence: float = WHITE_BOX_CONFIDENCE, broken: bool = True,
              encoder: str = "efficientnet-lite0") -> dict:
    """Audit the claimed epsilon of the production release path, without a Prefect run (`mepf audit`).

    The same steps as the `privacy-audit` flow: `audit_mechanism` (validates, calibrates),
    `neighbouring_sums`, `audit_neighbours` (see there for PASS and the power check with `broken`).
    """
    started = time.perf_counter()
    mechanism = audit_mechanism(target_epsilon=target_epsilon, target_delta=target_delta, relation=relation,
                                labelled=labelled, moments=moments, norm_bound=norm_bound,
                                second_moment_bound=second_moment_bound, draws=draws, confidence=confidence,
                                white_box_confidence=white_box_confidence)
    neighbours = neighbouring_sums(mechanism, labelled=labelled, moments=moments, norm_bound=norm_bound,
                                   second_moment_bound=second_moment_bound, encoder=encoder)
    report = audit_neighbours(neighbours, mechanism, target_epsilon=target_epsilon, labelled=labelled,
                              moments=moments, encoder=encoder, draws=draws, confidence=confidence,
                              white_box_confidence=white_box_confidence, broken=broken)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# --- membership inference ------------------------------------------------------------------------

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
    The game itself is `mepf_core.privacy.audit_run.membership_game`.
    """
    if base < 10 or candidates < 10 or releases_in < 1 or releases_out < 2:
        raise ValueError(f"need base, candidates >= 10, releases_in >= 1, releases_out >= 2, got "
                         f"{base}, {candidates}, {releases_in}, {releases_out}")
    fm = feature_map if feature_map is not None else build_feature_map("efficientnet-lite0")
    source = open_dataset("fashion-mnist", "train")
    images, labels = next(source.iter_batches(base + candidates))
    ref_images, ref_labels = public_images(REFERENCE_SIZE)
    return membership_game(fm, images, labels, ref_images, ref_labels, classes=source.num_classes, base=base,
                           candidates=candidates, releases_in=releases_in, releases_out=releases_out,
                           target_epsilon=target_epsilon, target_delta=target_delta, fpr=fpr,
                           confidence=confidence, seed=seed)


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
    The game itself is `mepf_core.privacy.audit_run.synthetic_membership_game`.
    """
    if members < 10 or steps < 1 or samples < 10:
        raise ValueError(f"need members >= 10, steps >= 1, samples >= 10, got {members}, {steps}, {samples}")
    fm = feature_map if feature_map is not None else build_feature_map("efficientnet-lite0")
    source = open_dataset("fashion-mnist", "train")
    images, labels = next(source.iter_batches(2 * members))
    return synthetic_membership_game(fm, images, labels, classes=source.num_classes, image_shape=source.image_shape,
                                     members=members, target_epsilon=target_epsilon, target_delta=target_delta,
                                     steps=steps, batch_size=batch_size, samples=samples, fpr=fpr,
                                     confidence=confidence, seed=seed)


# --- Prefect tasks (the `privacy-audit` flow) ----------------------------------------------------

@task(name="audit-mechanism", persist_result=False)
def design_audit_mechanism(*, target_epsilon: float, target_delta: float, relation: Neighbouring, labelled: bool,
                           moments: int, norm_bound: float, second_moment_bound: float, draws: int,
                           confidence: float, white_box_confidence: float) -> ReleaseMechanism:
    """Validate the audit's settings and calibrate the mechanism under audit (public)."""
    return audit_mechanism(target_epsilon=target_epsilon, target_delta=target_delta, relation=relation,
                           labelled=labelled, moments=moments, norm_bound=norm_bound,
                           second_moment_bound=second_moment_bound, draws=draws, confidence=confidence,
                           white_box_confidence=white_box_confidence)


@task(name="audit-neighbours", **_PRIVATE)
def extract_neighbours(mechanism: ReleaseMechanism, *, labelled: bool, moments: int, norm_bound: float,
                       second_moment_bound: float, encoder: str) -> Neighbours:
    """D and D' written as image folders and summed by the release's extraction (UN-NOISED sums)."""
    return neighbouring_sums(mechanism, labelled=labelled, moments=moments, norm_bound=norm_bound,
                             second_moment_bound=second_moment_bound, encoder=encoder)


@task(name="audit-draws", **_PRIVATE)
def audit_draws(neighbours: Neighbours, mechanism: ReleaseMechanism, *, target_epsilon: float, labelled: bool,
                moments: int, encoder: str, draws: int, confidence: float, white_box_confidence: float,
                broken: bool) -> dict:
    """Many releases of D and D', both checks and the sensitivity check; returns public numbers only."""
    return audit_neighbours(neighbours, mechanism, target_epsilon=target_epsilon, labelled=labelled,
                            moments=moments, encoder=encoder, draws=draws, confidence=confidence,
                            white_box_confidence=white_box_confidence, broken=broken)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _num(x) -> str:
    return "inf" if x is None else f"{x:.4g}"


def audit_markdown(report: dict) -> str:
    """The audit's public numbers as markdown: claim, black-box bound, white-box check, verdicts."""
    w = report["white_box"]
    lines = [
        f"# Privacy audit: {_verdict(report['pass'])}",
        "",
        f"{report['neighbouring']} release path ({report['encoder']}, "
        f"{'labelled' if report['labelled'] else 'unlabelled'}, moments={report['moments']}), "
        f"{report['draws']} releases per dataset; neighbours: {report['neighbours']}.",
        "",
        "| check | value | verdict |",
        "|---|---|---|",
        f"| claimed epsilon (delta {report['delta']:g}) | {report['claimed_epsilon']:.4f} | |",
        f"| black-box lower bound ({report['confidence']:.0%} CI) | {report['empirical_epsilon_lower_bound']:.4f} "
        f"[{_num(report['ci'][0])}, {_num(report['ci'][1])}] | {_verdict(report['black_box_pass'])} |",
        f"| white-box shift ({w['confidence']:.1%} CI) vs allowed {w['allowed_shift']:.4f} | {_num(w['shift'])} "
        f"[{_num(w['ci'][0])}, {_num(w['ci'][1])}] | {_verdict(w['pass'])} |",
        f"| white-box implied epsilon | {_num(w['implied_epsilon'])} | |",
        f"| sums moved within the claimed sensitivities | "
        + ", ".join(f"{k} {m['moved']:.4g} / {m['sensitivity']:.4g}" for k, m in report["movement"].items())
        + f" | {_verdict(report['within_sensitivity'])} |",
    ]
    if report.get("broken_releases"):
        lines += ["", "Deliberately broken releases (the checks' power):", "",
                  "| bug | black-box lower bound | white-box shift | caught |", "|---|---|---|---|"]
        lines += [f"| {b['bug']} | {b['lower_bound']:.4f} | {_num(b['white_box']['shift'])} | "
                  f"{'yes' if b['caught'] else 'NO'} |" for b in report["broken_releases"]]
    return "\n".join(lines) + "\n"


@task(name="publish-audit", persist_result=False)
def publish_audit(report: dict) -> str:
    """The audit's public numbers as a markdown artifact (key `privacy-audit`); returns the markdown."""
    markdown = audit_markdown(report)
    create_markdown_artifact(markdown, key="privacy-audit",
                             description=f"privacy audit at epsilon {report['claimed_epsilon']:.4g}: "
                                         f"{_verdict(report['pass'])}")
    return markdown
