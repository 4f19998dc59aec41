"""`train-generator` (release -> run directory) and `sample` (run directory -> synthetic dataset).

Both flows are public-stage only: they read the release file and encoder weights, never the
private data, and can be rerun at no privacy cost. Their parameters (`storage.params`) are
validated at the boundary.
"""

from __future__ import annotations

from prefect import flow

from storage.params import SampleParams, TrainParams
from tasks.public import load_release_task, sample_task, train_task


@flow(name="train-generator", persist_result=True)
def train_generator(params: TrainParams) -> dict:
    """Read the release, check its encoder, train (or resume), keep the best checkpoint.

    Retries (tasks.retries): the training task retries transient failures by resuming from its latest
    checkpoint, and so does this flow run when it is retried (UI, API) after its process died: the run
    folder's owner.json names the flow run that began it (tasks.public.train_task). A new flow run on a
    folder that holds a run still needs `resume`.
    """
    release = load_release_task(params.release, params.trusted_keys)
    return train_task(
        release, params.out, params.train_config(), params.resume, params.explicit_fields(),
        params.encoder_weights, params.progress,
    )


@flow(name="sample", persist_result=True)
def sample(params: SampleParams) -> dict:
    """Generate a synthetic dataset from a run's best checkpoint."""
    return sample_task(params.run, params.n, params.out, params.seed, params.device)
