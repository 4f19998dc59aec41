"""`evaluate`: FID and downstream accuracy of a run's synthetic dataset, and a report.

Uses only the synthetic dataset and a real, public test split. With `ceiling`, the same classifiers
are also trained on real training images as the non-private reference (that reads the training
split, so use it only where that split is public, as in benchmarks).

A reference or a ceiling that reads training records is refused unless `allow_private_reference` says
the user accepts it. The test is containment of resolved folders, not equality of ids
(`tasks.evaluation.reads_training_records`): `X:train`; an imagefolder whose folder read contains, or
lies inside, a training folder of it (`imagefolder:data` or `imagefolder:data:test` when data/ holds
only `train/`, a folder without `test/`, any spelling of `data/train` or a class folder in it).
FID statistics and accuracies computed from such a reference are un-noised functions of those
images and land in the report and in a Prefect artifact. Even with the flag, their FID statistics
are never cached under the user's home.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.metrics import MetricRow, write_report
from tasks.evaluation import (accuracy_task, fid_task, load_reference, load_synthetic, parse_reference,
                              reads_training_records, reference_cache_key)

CLASSIFIER_NAMES = ("logreg", "mlp", "cnn", "resnet9")


class EvaluateParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str = Field(..., description="run directory of a trained generator (holds synthetic.h5 after sampling)")
    synthetic: str | None = Field(None, description="synthetic dataset file (default RUN/synthetic.h5)")
    reference: str = Field("fashion-mnist:test", description="real public split: DATASET[:test|train]")
    data_root: str | None = None
    out: str = Field(..., description="folder for metrics.parquet, metrics.json, report.md, metrics.png")
    fid_samples: int = Field(5000, ge=0, description="synthetic images for FID (0: skip FID)")
    fid_reference: int | None = Field(None, ge=100, description="real images for the FID statistics (default all)")
    classifiers: tuple[str, ...] = ("logreg", "mlp", "cnn")
    train_samples: int | None = Field(None, ge=100, description="synthetic images to train classifiers on (default all)")
    ceiling: bool = Field(False, description="also train the classifiers on real training images")
    allow_private_reference: bool = Field(False, description="accept a reference or ceiling that reads a "
                                          "training split (possibly private); its statistics are not cached")
    seed: int = 0

    @field_validator("classifiers", mode="before")
    @classmethod
    def _split(cls, v):
        names = tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)
        unknown = [n for n in names if n not in CLASSIFIER_NAMES]
        if unknown:
            raise ValueError(f"unknown classifier(s) {unknown}; known: {', '.join(CLASSIFIER_NAMES)}")
        return names

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        from storage.datasets import DATASETS

        name, _ = parse_reference(v)
        if name not in DATASETS and not name.startswith("imagefolder:"):
            raise ValueError(f"unknown reference dataset {name!r}; known: {', '.join(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _private_reference(self) -> "EvaluateParams":
        if self.allow_private_reference:
            return self
        if reads_training_records(self.reference, self.data_root):
            raise ValueError(
                f"reference {self.reference!r} reads a training split, which may be the private data: its FID "
                "statistics are not differentially private. Use a test split, or pass --allow-private-reference "
                "(allow_private_reference=True) to accept it")
        if self.ceiling and self.classifiers:
            raise ValueError(
                "ceiling trains classifiers on the real training split, which may be the private data; pass "
                "--allow-private-reference (allow_private_reference=True) to accept it")
        return self

    @property
    def private_reference(self) -> bool:
        return reads_training_records(self.reference, self.data_root)


@flow(name="evaluate")
def evaluate(params: EvaluateParams) -> dict:
    synthetic_path = params.synthetic or str(Path(params.run) / "synthetic.h5")
    images, labels, meta = load_synthetic(synthetic_path)
    test_images, test_labels = load_reference(params.reference, params.data_root)
    metrics: dict[str, float] = {}
    if params.fid_samples > 0:
        reference_images = test_images[: params.fid_reference] if params.fid_reference else test_images
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
    rows = [MetricRow(run_name, k, float(v), meta.get("epsilon"), meta.get("delta"), str(meta.get("encoder", "")),
                      int(meta.get("steps", 0)), str(meta.get("release_id", ""))) for k, v in metrics.items()]
    rows += [MetricRow("real-data-ceiling", f"acc_{k}", float(v), None, None, "", 0, "") for k, v in ceiling.items()]
    grid = Path(params.run) / "samples.png"
    report = write_report(params.out, rows, grid if grid.is_file() else None)
    create_markdown_artifact(report.read_text(), key="dp-mepf-evaluation", description=f"evaluation of {run_name}")
    return {"run": params.run, "out": str(Path(params.out).resolve()), "report": str(report.resolve()),
            "epsilon": meta.get("epsilon"), "delta": meta.get("delta"), "release_id": meta.get("release_id"),
            "metrics": metrics, "ceiling": {f"acc_{k}": v for k, v in ceiling.items()}}
