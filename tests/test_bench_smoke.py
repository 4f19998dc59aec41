"""The benchmark scripts run, compare like with like, and merge their result files; nothing is timed.

Speed is only ever measured by the benchmarks themselves (DESIGN.md section 7), so these tests check
plumbing and the one correctness fact a speed ratio rests on: the published-code baseline computes
the same features as the registry's VGG19 map.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from bench import bench_extraction, bench_training_step, common
from mepf_core.encoders import build_feature_map


def test_baseline_vgg_features_equal_the_registry_map():
    """Hooked full-VGG19 features (published approach) == our staged map, given the same weights."""
    torch.manual_seed(0)
    ours = build_feature_map("vgg19", random_init=True)
    baseline = bench_training_step.PublishedVGGFeatures()
    ours_convs = [m for m in ours.stages.modules() if isinstance(m, nn.Conv2d)]
    base_convs = [m for m in baseline.net.features if isinstance(m, nn.Conv2d)]
    assert len(ours_convs) == len(base_convs) == 16
    with torch.no_grad():
        for a, b in zip(ours_convs, base_convs):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)
        images = torch.rand(2, 3, 32, 32)
        want, have = ours(images), baseline(images)
    assert have.shape == want.shape == (2, ours.feature_dim)
    assert torch.allclose(have, want, rtol=1e-4, atol=1e-5)


def test_baseline_generator_matches_the_paper_shape():
    gen = bench_training_step.PublishedResNetGenerator()
    with torch.no_grad():
        images = gen(torch.randn(4, 100))
    assert images.shape == (4, 3, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


@pytest.mark.slow
def test_training_step_bench_runs_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    argv = ["bench_training_step.py", "--configs", "fmnist", "--steps", "1", "--repeats", "2", "--warmup", "1",
            "--options", "default", "unfused", "malloc_heap", "--peak-size", "256"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_training_step.main()
    result = json.loads((tmp_path / "training_step.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"default", "unfused", "malloc_heap"}
    assert "keep_freed_memory() first" in rows["malloc_heap"]["note"]  # ran in a child, production's call
    assert rows["default"]["note"].startswith("build_trainer (production)")
    assert "LD_PRELOAD=libtcmalloc_minimal.so.4" in rows["default"]["note"]  # as `mepf train` runs
    assert rows["default"]["rss_peak_mib"] >= rows["default"]["rss_imports_mib"] > 0  # its own child's memory
    assert rows["default"]["ratio"] == 1.0 and rows["default"]["timed_steps"] == 2
    assert rows["default"]["gflop_per_step"] > 0 and rows["default"]["conv_peak_fraction"] > 0
    assert rows["default"]["command"].endswith("--peak-size 256")
    assert "images_per_s" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", argv[:-5] + ["default", "--peak-size", "256"])  # a second run merges
    bench_training_step.main()
    result = json.loads((tmp_path / "training_step.json").read_text())
    assert sorted(r["variant"] for r in result["rows"]) == ["default", "malloc_heap", "unfused"]
    assert len(result["commands"]) == 2


def test_the_bench_builds_its_trainer_through_the_production_function(monkeypatch):
    """One place decides how `mepf train` sets up a run: the bench's trainer comes from
    `build_trainer`, which applies `prepare_training_process` (tasks/public.py calls the same)."""
    import inspect

    from mepf_core import allocator
    from tasks import public

    calls = []
    monkeypatch.setattr(allocator, "prepare_training_process", lambda device: calls.append(str(device)) or {})
    trainer = bench_training_step.make_trainer(bench_training_step.CONFIGS["fmnist"], "cpu")
    assert calls == ["cpu"] and trainer.amp_dtype is None  # "auto": fp32 for Lite0 on any CPU
    assert "build_trainer(" in inspect.getsource(public._release_trainer)
    # `mepf` runs under tcmalloc (installed by scripts/setup.sh), so the production variants do too
    assert bench_training_step.process_parts("default") == ["tcmalloc"]
    assert bench_training_step.process_parts("baseline") == ["baseline"]  # the published code: glibc
    assert bench_training_step.same_process_baseline("default") == "baseline+tcmalloc"
    assert bench_training_step.same_process_baseline("glibc") == "baseline+malloc_heap"
    assert bench_training_step.same_process_baseline("system_malloc") == "baseline"
    assert bench_training_step.same_process_baseline("omp_passive+bf16") == "baseline+omp_passive+tcmalloc"


def test_baseline_combines_with_process_options_only():
    assert bench_training_step.option_name("baseline+malloc_heap") == "baseline+malloc_heap"
    with pytest.raises(argparse.ArgumentTypeError, match="combines only with"):
        bench_training_step.option_name("baseline+threads1")


def test_extraction_rows_merge_and_memory_check():
    old = [{"encoder": "efficientnet-lite0", "n": n, "peak_rss_mib": 1000.0 + n / 1000, "command": "a"}
           for n in (10, 20)]
    new = [{"encoder": "vgg19", "n": n, "peak_rss_mib": rss, "env": "default", "command": "b"}
           for n, rss in ((5, 3000.0), (10, 3500.0))]
    rows = bench_extraction.merge_rows(old, new)
    assert [(r["encoder"], r["n"]) for r in rows] == [("efficientnet-lite0", 10), ("efficientnet-lite0", 20),
                                                      ("vgg19", 5), ("vgg19", 10)]
    flat = bench_extraction.memory_flat(rows)
    assert flat["efficientnet-lite0"]["within_10pct"] is True
    assert flat["vgg19"]["within_10pct"] is False and flat["vgg19"]["rss_ratio"] == pytest.approx(3500 / 3000, abs=1e-3)
    replaced = bench_extraction.merge_rows(rows, [{**new[0], "peak_rss_mib": 1.0}])
    assert len(replaced) == 4 and [r["peak_rss_mib"] for r in replaced if r["encoder"] == "vgg19"][0] == 1.0


def test_quality_rows_merge_by_epsilon_and_a_pipeline_run_becomes_a_row(tmp_path):
    from bench import bench_quality

    (tmp_path / "run").mkdir()
    (tmp_path / "report").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps(
        {"release": {"epsilon": 9.9999999997}, "steps_done": 10_000, "train_seconds": 480.0, "config": {"seed": 1}}))
    (tmp_path / "report" / "metrics.json").write_text(json.dumps(
        [{"metric": "fid", "value": 53.91, "fid_synthetic_count": 2000, "fid_reference_count": 2000},
         {"metric": "acc_cnn", "value": 0.762}]))
    row = bench_quality.pipeline_row(tmp_path)
    assert row["epsilon"] == 10.0 and row["steps"] == 10_000 and row["train_minutes"] == 8.0
    assert row["seed"] == 1 and row["fid_counts"] == [2000, 2000]
    assert row["fid"] == 53.91 and row["commands"] == [f"mepf run --out-dir {tmp_path}"]
    old = [{"epsilon": 10.0, "seed": 1, "fid": 77.9}, {"epsilon": 1.0, "seed": 1, "fid": 81.4}, {"epsilon": "real data (ceiling)"}]
    merged = bench_quality.merge(old, [row])
    assert [r["epsilon"] for r in merged] == [1.0, "real data (ceiling)", 10.0] and merged[-1]["fid"] == 53.91
    # the spread over seeds never mixes FIDs of different sample sizes
    seeds = [{**row, "tag": "t"}, {**row, "tag": "t", "seed": 2, "fid": 55.91, "acc_cnn": 0.772},
             {**row, "tag": "t", "seed": 0, "fid": 60.0, "fid_counts": [1000, 1000], "acc_cnn": 0.752}]
    (summary,) = bench_quality.spread(seeds)
    assert summary["seeds"] == [0, 1, 2] and summary["acc_cnn"]["n"] == 3
    assert summary["fid@2000v2000"] == {"mean": 54.91, "sd": 1.4142, "min": 53.91, "max": 55.91, "n": 2}
    assert "fid@1000v1000" not in summary and "fid" not in summary


def test_levers_score_saved_images_of_either_layout(tmp_path):
    """bench_levers --from-images reads its own VARIANT.npz (images N x C x H x W, labels) and what `mepf
    sample` writes (.h5 / .npz, channels last in .npz), to the same pixels and labels; unlabelled refused."""
    from bench import bench_levers
    from storage.provenance import SyntheticInfo
    from storage.synthetic import write_synthetic

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    info = SyntheticInfo(release_id="r", epsilon=1.0, delta=1e-5, encoder="efficientnet-lite0",
                         class_names=("a", "b", "c"), steps=1)
    np.savez_compressed(tmp_path / "raw.npz", images=images, labels=labels)
    write_synthetic(tmp_path / "sampled.npz", images, labels, info)
    write_synthetic(tmp_path / "sampled.h5", images, labels, info)
    for name in ("raw.npz", "sampled.npz", "sampled.h5"):
        got_images, got_labels = bench_levers.saved_images(tmp_path / name)
        assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels), name
    unlabelled = dataclasses.replace(info, class_names=None)
    write_synthetic(tmp_path / "u.h5", images, None, unlabelled)
    with pytest.raises(SystemExit, match="no labels"):
        bench_levers.saved_images(tmp_path / "u.h5")
