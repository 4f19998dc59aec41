"""`evaluate`: FID and downstream accuracy of a run's synthetic dataset, and a report.

Uses only the synthetic dataset and a real, public test split. With `ceiling`, the same classifiers
are also trained on real training images as the non-private reference (that reads the training
split, so use it only where that split is public, as in benchmarks).

A reference or a ceiling that reads training records is refused unless `allow_private_reference` says
the user accepts it. The test is containment of resolved folders, not equality of ids
(`storage.references.reads_training_records`): `X:train`; an imagefolder whose folder read contains, or
lies inside, a training folder of it (`imagefolder:data` or `imagefolder:data:test` when data/ holds
only `train/`, a folder without `test/`, any spelling of `data/train` or a class folder in it).
FID statistics and accuracies computed from such a reference are un-noised functions of those
images (the FID's reference count is the split's size, the accuracies are fractions whose
denominators are its class sizes): they land in the report on disk only. Prefect, which a shared
server shows to the public side, gets a note naming the report instead of the table and report
artifacts (`publish_evaluation`), as the dataset card records no number. Even with the flag, their
FID statistics are never cached under the user's home.

FID needs at least FID_MIN_SAMPLES (2,048) synthetic and reference images unless `allow_small_fid`
(checked on the parameters and again on the counts actually available, before Inception runs); every
FID row and the returned dict carry the counts used (`fid_synthetic_count`, `fid_reference_count`).

A run that has not been sampled is sampled here first (`synthetic_for`): RUN/synthetic.h5 is drawn
from its best checkpoint by the same `sample-synthetic` task as `mepf sample`, so deployments draw it
too; an existing one is reused as it is (`warn_if_small`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from mepf_core.errors import PathNotFoundError
from storage.dataset_card import Utility, record_utility
from storage.metrics import CLASS_METRIC_PREFIX, MetricRow, embed_report_images, named_classes, write_report
from storage.params import EvaluateParams, SampleParams
from tasks.evaluation import (
    accuracy_task,
    fid_counts,
    fid_task,
    load_reference,
    load_synthetic,
    parse_reference,
    reference_cache_key,
    synthetic_path_for,
)
from tasks.artifacts import REPORT_KEY, metrics_table, publish_markdown, publish_metrics_table
from tasks.public import sample_task


def synthetic_for(params: EvaluateParams) -> str:
    """The synthetic dataset to evaluate, drawn from the run when it has none yet.

    `params.synthetic`, when given, is the user's file and must exist (PathNotFoundError otherwise:
    nothing is drawn under a name the user typed). Else RUN/synthetic.h5: reused when present; when
    missing, drawn by the `sample-synthetic` task from the run's best checkpoint (else its latest),
    `params.samples_to_draw` images with codes from `params.seed`; the file records n, the seed, the
    checkpoint and its step (storage.provenance.SyntheticInfo).
    """
    if params.synthetic is not None:
        if not Path(params.synthetic).exists():
            raise PathNotFoundError(f"synthetic dataset {params.synthetic} does not exist; omit --synthetic to "
                                    f"evaluate RUN/synthetic.h5 (drawn from the run when missing)")
        return params.synthetic
    path = synthetic_path_for(params.run)
    if not path.is_file():
        draw = SampleParams(run=params.run, n=params.samples_to_draw, out=str(path), seed=params.seed)
        get_run_logger().info("%s has no synthetic set yet: drawing %d images (seed %d) from its best checkpoint",
                              params.run, draw.n, draw.seed)
        sample_task(draw.run, draw.n, draw.out, draw.seed, draw.device)
    return str(path)


def warn_if_small(params: EvaluateParams, n_synthetic: int) -> None:
    """Log a warning when an existing synthetic set holds fewer images than the evaluation asks for.

    Such a set is evaluated as it is, never replaced (it may be one the user drew on purpose): FID uses
    min(fid_samples, n) images (its counts are recorded and FID_MIN_SAMPLES still applies), the
    classifiers train on all n. Draw a larger one with `mepf sample --run RUN --n N --out RUN/synthetic.h5`.
    """
    asked = {"fid_samples": params.fid_samples, "train_samples": params.train_samples if params.classifiers else None}
    short = {k: v for k, v in asked.items() if v and v > n_synthetic}
    if short:
        get_run_logger().warning(
            "the synthetic set holds %d images, fewer than %s: evaluating those %d (draw more with `mepf sample "
            "--run %s --n %d --out ...`)", n_synthetic, ", ".join(f"{k} {v}" for k, v in short.items()),
            n_synthetic, params.run, max(short.values()))


def publish_evaluation(report: Path, rows: list[MetricRow], meta, run_name: str,
                       private_reference: bool = False) -> None:
    """The evaluation in the Prefect UI: a table artifact of the headline metrics (FID with its counts,
    accuracies, epsilon, delta, relation, release id; per-class rows stay in the files) and the report
    as a markdown artifact whose images are embedded as data URIs (report.md on disk keeps its links).

    private_reference (the reference reads training records, `--allow-private-reference`): every number
    of the evaluation is then an un-noised function of private records (the reference count is n, a
    per-class accuracy k/n_c gives the class size away), so Prefect gets only a markdown note naming
    the report file on this machine; the flag accepts them in the report, not on a shared server."""
    if private_reference:
        publish_markdown(f"# Evaluation of `{run_name}` (release `{meta.release_id}`)\n\nMeasured against a reference "
                         "that reads training records (`--allow-private-reference`): its numbers are un-noised "
                         f"statistics of those records and stay in `{report}` on this machine.\n",
                         key=REPORT_KEY, description=f"evaluation of {run_name}")
        return
    headline = [r for r in rows if r.class_name is None]
    publish_metrics_table(metrics_table(headline, relation=meta.neighbouring),
                          description=f"metrics of {run_name} (release {meta.release_id})")
    publish_markdown(embed_report_images(report.read_text(), report.parent), key=REPORT_KEY,
                     description=f"evaluation of {run_name}")


CLASSIFIER_RUN_NAME = "downstream-accuracy"  # task runs RUN_NAME-CLASSIFIER; bench/bench_pipeline.py reads them


def scores_by_classifier(train_images, train_labels, test_images, test_labels, classifiers, seed: int,
                         run_name: str = CLASSIFIER_RUN_NAME) -> dict:
    """Classifier name -> ClassifierScore, one `downstream-accuracy` task run per classifier, named
    RUN_NAME-CLASSIFIER (e.g. downstream-accuracy-cnn), so Prefect records each one's run time. The
    same scores as one call over all: each classifier is seeded with `seed` on its own
    (mepf_core.classifiers.downstream_scores)."""
    return {name: accuracy_task.with_options(task_run_name=f"{run_name}-{name}")(
        train_images, train_labels, test_images, test_labels, [name], seed)[name] for name in classifiers}


@flow(name="evaluate")
def evaluate(params: EvaluateParams) -> dict:
    """FID and downstream accuracy of the run's synthetic set (drawn first when missing: `synthetic_for`)."""
    synthetic_path = synthetic_for(params)
    images, labels, meta = load_synthetic(synthetic_path)
    warn_if_small(params, len(images))
    # The reference (and the ceiling's training split) must describe what the synthetic images describe:
    # shape, number and names of classes; checked before any image is decoded or Inception runs.
    like = dict(synthetic_shape=tuple(images.shape[1:]), synthetic_classes=None if labels is None else meta.class_names,
                synthetic_name=f"the synthetic dataset {synthetic_path} (release {meta.release_id})")
    test_images, test_labels = load_reference(params.reference, params.data_root, **like)
    metrics: dict[str, float] = {}
    class_accuracy: dict[str, dict[str, float]] = {}  # "acc_logreg" -> class name -> accuracy on that class
    counts = None
    if params.fid_samples > 0:
        reference_images = test_images[: params.fid_reference] if params.fid_reference else test_images
        counts = fid_counts(len(images), params.fid_samples, len(reference_images), params.allow_small_fid,
                            private_reference=params.private_reference)
        metrics["fid"] = fid_task(images, reference_images, reference_cache_key(params.reference, params.data_root),
                                  params.fid_samples, cache=not params.private_reference)
    n = params.train_samples or len(images)
    if params.classifiers:
        scores = scores_by_classifier(images[:n], None if labels is None else labels[:n], test_images, test_labels,
                                      params.classifiers, params.seed)
        metrics.update({f"acc_{k}": s.accuracy for k, s in scores.items()})
        class_accuracy = {f"acc_{k}": dict(named_classes(s.per_class, meta.class_names)) for k, s in scores.items()}
    ceiling, ceiling_classes = {}, {}
    if params.ceiling and params.classifiers:
        name, _ = parse_reference(params.reference)
        real_images, real_labels = load_reference(f"{name}:train", params.data_root, n, **like)
        real = scores_by_classifier(real_images, real_labels, test_images, test_labels, params.classifiers,
                                    params.seed, run_name="ceiling-accuracy")
        ceiling = {f"acc_{k}": s.accuracy for k, s in real.items()}
        ceiling_classes = {f"acc_{k}": dict(named_classes(s.per_class, meta.class_names)) for k, s in real.items()}
    run_name = Path(params.run).name
    rows = [MetricRow.of_synthetic(run_name, k, v, meta, counts if k.startswith("fid") else None)
            for k, v in metrics.items()]
    rows += [MetricRow.of_real_data("real-data-ceiling", k, v) for k, v in ceiling.items()]
    rows += [MetricRow.of_synthetic(run_name, CLASS_METRIC_PREFIX + k, v, meta, class_name=c)
             for k, per_class in class_accuracy.items() for c, v in per_class.items()]
    rows += [MetricRow.of_real_data("real-data-ceiling", CLASS_METRIC_PREFIX + k, v, class_name=c)
             for k, per_class in ceiling_classes.items() for c, v in per_class.items()]
    grid = Path(params.run) / "samples.png"
    report = write_report(params.out, rows, grid if grid.is_file() else None)
    try:  # the export's DATASET_CARD.md gets the metrics (storage.dataset_card)
        record_utility(synthetic_path, Utility(params.reference, metrics, counts, str(report.resolve()),
                                               params.private_reference),
                       info=meta, count=len(images), image_shape=tuple(images.shape[1:]))
    except OSError as exc:  # e.g. a read-only export: the report stands, the card stays as it was
        get_run_logger().warning("the dataset card beside %s was not updated: %s", synthetic_path, exc)
    publish_evaluation(report, rows, meta, run_name, params.private_reference)
    return {"run": params.run, "out": str(Path(params.out).resolve()), "report": str(report.resolve()),
            "epsilon": meta.epsilon, "delta": meta.delta, "release_id": meta.release_id,
            "metrics": metrics, "ceiling": ceiling,
            "class_accuracy": class_accuracy, "ceiling_class_accuracy": ceiling_classes,
            "fid_synthetic_count": counts[0] if counts else None,
            "fid_reference_count": counts[1] if counts else None}
