"""Sharded extraction on a local Dask cluster equals one process, and the flow runs unchanged there."""

import numpy as np
from prefect import flow
from prefect_dask import DaskTaskRunner

from flows.custodian_release import custodian_release, extract_sums
from flows.release_params import ReleaseParams
from storage.release import read_release
from tasks.custodian import extract_shard


def _runner():
    return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


def test_dask_shards_match_single_process_and_flow_runs(tmp_path):
    params = ReleaseParams(target_epsilon=1.0, out=str(tmp_path / "r.h5"), limit=96, batch_size=32, shards=3,
                           labelled=True, moments=2)

    @flow(task_runner=_runner())
    def sharded_sums():
        return extract_sums(params)

    sharded = sharded_sums()
    single = extract_shard.fn(params.model_copy(update={"shards": 1}), 0)
    for name, value in single.parts().items():
        np.testing.assert_allclose(sharded.parts()[name], value, rtol=1e-12, atol=1e-12)

    result = custodian_release.with_options(task_runner=_runner())(params)
    assert read_release(result["path"]).metadata.epsilon <= 1.0
