"""`dp-mepf-pipeline`: custodian-release -> train-generator -> sample -> evaluate, as subflows.

Only the release file's path crosses from the custodian's subflow to the public ones.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.custodian_release import custodian_release
from flows.evaluate import evaluate
from flows.train_generator import sample, train_generator
from storage.params import EvaluateParams, PipelineParams, SampleParams, TrainParams


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
            "run": trained, "samples": sampled, "report": evaluated["report"], "metrics": evaluated["metrics"],
            "fid_synthetic_count": evaluated["fid_synthetic_count"],
            "fid_reference_count": evaluated["fid_reference_count"]}
