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
images and land in the report and in a Prefect artifact. Even with the flag, their FID statistics
are never cached under the user's home.

FID needs at least FID_MIN_SAMPLES (2,048) synthetic and reference images unless `allow_small_fid`
(checked on the parameters and again on the counts actually available, before Inception runs); every
FID row and the returned dict carry the counts used (`fid_synthetic_count`, `fid_reference_count`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from storage.metrics import MetricRow, write_report
from storage.params import EvaluateParams
from tasks.evaluation import (
    accuracy_task,
    fid_counts,
    fid_task,
    load_reference,
    load_synthetic,
    parse_reference,
    reference_cache_key,
)


@flow(name="evaluate")
def evaluate(params: EvaluateParams) -> dict:
    synthetic_path = params.synthetic or str(Path(params.run) / "synthetic.h5")
    images, labels, meta = load_synthetic(synthetic_path)
    test_images, test_labels = load_reference(params.reference, params.data_root)
    metrics: dict[str, float] = {}
    counts = None
    if params.fid_samples > 0:
        reference_images = test_images[: params.fid_reference] if params.fid_reference else test_images
        counts = fid_counts(len(images), params.fid_samples, len(reference_images), params.allow_small_fid)
        metrics["fid"] = fid_task(images, reference_images, reference_cache_key(params.reference, params.data_root),
                                  params.fid_samples, cache=not params.private_reference)
    n = params.train_samples or len(images)
    if params.classifiers:
        accs = accuracy_task(images[:n], None if labels is None else labels[:n], test_images, test_labels,
                             list(params.classifiers), params.seed)
        metrics.update({f"acc_{k}": v for k, v in accs.items()})
    ceiling = {}
    if params.ceiling and params.classifiers:
        name, _ = parse_reference(params.reference)
        real_images, real_labels = load_reference(f"{name}:train", params.data_root, n)
        ceiling = accuracy_task(real_images, real_labels, test_images, test_labels, list(params.classifiers), params.seed)
    run_name = Path(params.run).name
    rows = [MetricRow.of_synthetic(run_name, k, v, meta, counts if k.startswith("fid") else None)
            for k, v in metrics.items()]
    rows += [MetricRow.of_real_data("real-data-ceiling", f"acc_{k}", v) for k, v in ceiling.items()]
    grid = Path(params.run) / "samples.png"
    report = write_report(params.out, rows, grid if grid.is_file() else None)
    create_markdown_artifact(report.read_text(), key="dp-mepf-evaluation", description=f"evaluation of {run_name}")
    return {"run": params.run, "out": str(Path(params.out).resolve()), "report": str(report.resolve()),
            "epsilon": meta.epsilon, "delta": meta.delta, "release_id": meta.release_id,
            "metrics": metrics, "ceiling": {f"acc_{k}": v for k, v in ceiling.items()},
            "fid_synthetic_count": counts[0] if counts else None,
            "fid_reference_count": counts[1] if counts else None}
