"""bench/bench_pipeline.py's bookkeeping on fixed Prefect-like records (nothing is run or timed here)."""

from __future__ import annotations

from types import SimpleNamespace

from bench import bench_pipeline as bp


def test_task_names_drop_prefects_dynamic_key_suffix():
    run = lambda name, key: SimpleNamespace(name=name, dynamic_key=key)  # noqa: E731
    assert bp.task_name(run("charge-noise-release-8a7", "8a7f0c1e")) == "charge-noise-release"
    assert bp.task_name(run("extract-shard-0", "0")) == "extract-shard"
    assert bp.task_name(run("reduce-sums", "3b1")) == "reduce-sums"  # no suffix: the name as it is


def test_breakdown_groups_subflows_and_tasks_into_stages():
    def rec(name, seconds, start, subflow=None):
        return {"name": name, "seconds": seconds, "start_s": start, "subflow": subflow, "state": "COMPLETED"}

    subflows = [rec("custodian-release", 40.0, 1.0), rec("train-generator", 480.0, 41.0),
                rec("sample", 1.0, 521.0), rec("evaluate", 80.0, 522.0)]
    tasks = [rec("calibrate", 0.5, 1.1, "custodian-release"), rec("extract-shard", 30.0, 2.0, "custodian-release"),
             rec("extract-shard", 30.0, 2.0, "custodian-release"), rec("train-generator", 479.0, 41.5, "train-generator"),
             rec("fid", 50.0, 523.0, "evaluate"), rec("downstream-accuracy-logreg", 5.0, 573.0, "evaluate"),
             rec("downstream-accuracy-cnn", 20.0, 578.0, "evaluate"),
             rec("load-reference", 2.0, 522.5, "evaluate")]
    stderr = ("2026-11-30 10:00:00,000 INFO prefect: Starting temporary server on http://127.0.0.1:8776\n"
              "2026-11-30 10:00:12,500 INFO prefect.flow_runs: Beginning flow run 'x' for flow 'dp-mepf-pipeline'\n"
              "2026-11-30 10:09:40,000 INFO mepf_core.classifiers: logreg: test accuracy 0.7570 (4.2 s)\n"
              "2026-11-30 10:09:55,000 INFO mepf_core.classifiers: cnn: test accuracy 0.7620 (20.1 s)\n")
    out = bp.breakdown(620.0, {"seconds": 602.0}, subflows, tasks, stderr)
    assert (out["release_s"], out["training_s"], out["sampling_s"], out["evaluation_s"]) == (40.0, 480.0, 1.0, 80.0)
    assert (out["fid_s"], out["classifiers_s"], out["evaluation_other_s"]) == (50.0, 25.0, 5.0)
    assert out["overhead_s"] == 19.0 and out["overhead_outside_flow_s"] == 18.0
    assert out["stages"]["release"]["tasks"]["extract-shard"] == {"seconds": 60.0, "runs": 2}
    assert out["stages"]["release"]["untracked_s"] == -20.5  # the two shards overlapped
    assert out["classifiers"] == {"logreg": 5.0, "cnn": 20.0}  # Prefect's record of each classifier's task run
    assert out["classifiers_from_log"] == {"logreg": 4.2, "cnn": 20.1}
    assert out["server_start_from_log_s"] == 12.5
