"""`dp-mepf-pipeline`: custodian-release -> train-generator -> sample -> evaluate, as subflows.

Only the release file's path crosses from the custodian's subflow to the public ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.custodian_release import custodian_release
from flows.evaluate import EvaluateParams, evaluate
from flows.release_params import ReleaseParams
from flows.train_generator import DEFAULT_STEPS, SampleParams, TrainParams, sample, train_generator
from mepf_core.privacy.sensitivity import Neighbouring
from mepf_core.training import TrainConfig


class PipelineParams(BaseModel):
    """The end-to-end job; defaults finish in about 20 minutes on 2 CPU cores (Fashion-MNIST)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out_dir: str = Field(None, description="folder for release.h5, run/ and report/ (default runs/TIMESTAMP)")
    # custodian stage
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    target_epsilon: float = Field(10.0, description="epsilon of the release")
    target_delta: float = 1e-5
    labelled: bool = True
    neighbouring: Neighbouring = Neighbouring.ADD_REMOVE
    moments: int = 1
    encoder: str = "efficientnet-lite0"
    ledger: str | None = None
    budget: float | None = None
    limit: int | None = Field(None, description="use only the first LIMIT private images (tests; replace-one only)")
    # public stage
    steps: int = Field(DEFAULT_STEPS, description="generator training steps")
    batch_size: int = 100
    lr_gen: float = TrainConfig.lr_gen
    lr_mavg: float = TrainConfig.lr_mavg
    lr_schedule: Literal["cosine", "constant"] = TrainConfig.lr_schedule
    checkpoint_every: int = 500
    eval_samples: int = 2000
    n_samples: int = Field(10_000, description="synthetic images drawn for evaluation")
    reference: str = "fashion-mnist:test"
    fid_samples: int = Field(1000, description="synthetic images for FID (Inception runs ~10 images/s on 2 cores)")
    fid_reference: int | None = Field(1000, description="real test images for the FID statistics (None: all)")
    classifiers: tuple[str, ...] = ("logreg", "mlp", "cnn")
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _default_out_dir(cls, values):
        if isinstance(values, dict) and not values.get("out_dir"):
            values = {**values, "out_dir": str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))}
        return values

    def stage_params(self) -> tuple[ReleaseParams, dict, dict]:
        """Validate every stage's parameters up front, before any work is done."""
        out = Path(self.out_dir)
        release = ReleaseParams(
            dataset=self.dataset, data_root=self.data_root, out=str(out / "release.h5"),
            target_epsilon=self.target_epsilon, target_delta=self.target_delta, labelled=self.labelled,
            neighbouring=self.neighbouring,
            moments=self.moments, encoder=self.encoder, ledger=self.ledger, budget=self.budget, limit=self.limit,
        )
        train = dict(out=str(out / "run"), steps=self.steps, batch_size=self.batch_size, lr_gen=self.lr_gen,
                     lr_mavg=self.lr_mavg, lr_schedule=self.lr_schedule, checkpoint_every=self.checkpoint_every,
                     eval_samples=self.eval_samples, device=self.device)
        evaluation = dict(run=str(out / "run"), out=str(out / "report"), reference=self.reference,
                          data_root=None, fid_samples=self.fid_samples, fid_reference=self.fid_reference,
                          classifiers=self.classifiers)
        EvaluateParams(**evaluation)  # validates classifier names and the reference now
        return release, train, evaluation


@flow(name="dp-mepf-pipeline")
def dp_mepf_pipeline(params: PipelineParams) -> dict:
    release_params, train, evaluation = params.stage_params()
    Path(release_params.out).parent.mkdir(parents=True, exist_ok=True)
    released = custodian_release(release_params)
    release_path = released["path"]  # the only thing that crosses the trust boundary
    trained = train_generator(TrainParams(release=release_path, **train))
    sampled = sample(SampleParams(run=train["out"], n=params.n_samples))
    evaluated = evaluate(EvaluateParams(**evaluation))
    return {"release": release_path, "epsilon": released["epsilon"], "delta": released["delta"],
            "run": trained, "samples": sampled, "report": evaluated["report"], "metrics": evaluated["metrics"]}
