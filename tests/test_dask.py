"""Sharded extraction on a local Dask cluster equals one process, the flow runs unchanged there, and the
custodian's workers never spill (the un-noised partial sums they hold) to disk."""

import numpy as np
from prefect import flow, task

from flows.custodian_release import WORKER_NO_SPILL, custodian_release, extract_sums, private_dask_runner
from storage.params import ReleaseParams
from storage.release import read_release
from tasks.custodian import extract_shard


def _runner():
    return private_dask_runner(n_workers=2, threads_per_worker=1)


@task
def _worker_memory_settings() -> dict:
    from distributed import get_worker

    mm = get_worker().memory_manager
    return {"target": mm.memory_target_fraction, "spill": mm.memory_spill_fraction,
            "buffer": type(mm.data).__name__}


def test_dask_shards_match_single_process_and_flow_runs(tmp_path):
    # limit is refused under add-remove (not a per-record selection); replace-one keeps the relation
    params = ReleaseParams(target_epsilon=1.0, out=str(tmp_path / "r.h5"), limit=96, batch_size=32, shards=3,
                           labelled=True, moments=2, neighbouring="replace-one")

    @flow(task_runner=_runner())
    def sharded_sums():
        settings = [_worker_memory_settings.submit() for _ in range(4)]
        return extract_sums(params), [s.result() for s in settings]

    sharded, settings = sharded_sums()
    # workers in their own processes: no spill fractions, and a plain dict (not a disk-backed SpillBuffer)
    assert settings == [{"target": False, "spill": False, "buffer": "dict"}] * 4
    assert WORKER_NO_SPILL == {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}
    single = extract_shard.fn(params.model_copy(update={"shards": 1}), 0)
    for name, value in single.parts().items():
        np.testing.assert_allclose(sharded.parts()[name], value, rtol=1e-12, atol=1e-12)

    result = custodian_release.with_options(task_runner=_runner())(params)
    assert read_release(result["path"]).metadata.epsilon <= 1.0
