"""Training-step benchmark: seconds per generator update, images/s and the share of peak FLOP rate.

Two configurations, each timed through the production `Trainer.train_step` on release-like random
targets (class means of the public map's features on random images, plus release-sized noise):

- fmnist: EfficientNet-Lite0 (packaged ImageNet weights), the 28x28 generator, batch 100, 10 classes.
- cifar10: the paper's setting: VGG19, all 16 conv layers (random init: speed does not depend on
  the weights), the ResNet generator, batch 128, 32x32 RGB, 10 classes. Also timed: `baseline`, the
  published code's approach written out here (full torchvision VGG19 forward, avgpool and classifier
  included, forward hooks on every conv, flatten + concatenate, norm bound, per-class means,
  squared distance, backward, Adam); `baseline_ratio` is ours / baseline in images per second.

Options are variants of the production step, each reported as `ratio` = default s/step over the
variant's s/step in the same round (> 1 is faster): channels_last, torch.compile (steady state;
compile time reported apart), bf16 autocast (the Trainer's own autocast path, enabled on the CPU),
mkldnn off, mkldnn implicit bf16 for fp32 convs/matmuls, flush-denormal, one intra-op thread, and
two that need a fresh process, run in a child driven step by step over a pipe: `omp_passive`
(OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning) and `malloc_heap` (glibc
keeps freed memory instead of unmapping it, so large per-step tensors do not page-fault fresh
zeroed pages every step; the training task's own `keep_freed_memory()`). For Lite0 also the
unfused (batch norms kept) public map. Options combine with '+', e.g. channels_last+threads1,
omp_passive+malloc_heap, or baseline+malloc_heap (the baseline under the same allocator). Variants run interleaved in rounds
(A B C, then B C A, ...) because the machine is shared: every s/step is a median over all timed steps,
every ratio a median over rounds. The fp32 matmul peak is measured in each round too (with a large
channels-last conv as a second reference: on AMD CPUs MKL's matmul reaches only about half of what
oneDNN's convolutions do), and FLOPs per step are counted with `FlopCounterMode` over one
forward+backward step of each model.

    python bench/bench_training_step.py [--configs fmnist cifar10] [--steps 20] [--repeats 3]
        [--warmup 3] [--options default baseline unfused channels_last compile bf16 mkldnn_off
        mkldnn_bf16 flush_denormal threads1 omp_passive malloc_heap channels_last+threads1 ...]
        [--device cpu|cuda] [--profile]

Rows merge into bench/results/training_step.json by (device, OpenMP environment, config, variant),
each with its command and the load average, so runs under different environments (e.g. the whole
bench under OMP_WAIT_POLICY=PASSIVE) sit side by side. On cuda the Trainer's mixed precision (bf16
autocast) is on, as in production, and the CPU-only options are skipped. `--profile` adds
torch.profiler's top ops of two default steps per configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import command_line, env_label, environment, median, table, write_result  # noqa: E402
from mepf_core.allocator import keep_freed_memory  # noqa: E402
from mepf_core.encoders import build_feature_map  # noqa: E402
from mepf_core.losses import class_weight_matrix  # noqa: E402
from mepf_core.public_map import PublicFeatureMap  # noqa: E402
from mepf_core.training import TrainConfig, Trainer, balanced_labels  # noqa: E402

logger = logging.getLogger("bench_training_step")

NUM_CLASSES = 10
RELEASE_NOISE = 1e-3  # per-coordinate std of the fake release's noise (eps ~1, n ~ 6,000 per class)
ALL_OPTIONS = ("default", "baseline", "unfused", "channels_last", "compile", "bf16", "mkldnn_off", "mkldnn_bf16",
               "flush_denormal", "threads1", "omp_passive", "malloc_heap")
CPU_ONLY = {"bf16", "mkldnn_off", "mkldnn_bf16", "flush_denormal", "threads1", "omp_passive", "malloc_heap"}
# Options that need a fresh process: the environment of the child that runs the variant's steps.
ENV_OPTIONS = {
    "omp_passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # idle OpenMP threads sleep instead of spinning
    # glibc serves every allocation from its heap and keeps freed memory: no fresh zeroed pages
    # (page faults) for each step's large activation tensors
}
# Options that change the process itself, applied first thing in the child: production's own calls.
CHILD_SETUP: dict[str, Callable[[], object]] = {
    # glibc keeps freed memory (the training task's keep_freed_memory), so large per-step tensors
    # do not page-fault fresh zeroed pages every step
    "malloc_heap": keep_freed_memory,
}
FRESH_PROCESS = ENV_OPTIONS.keys() | CHILD_SETUP.keys()
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "MALLOC_MMAP_MAX_",
            "MALLOC_TRIM_THRESHOLD_")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    encoder: str
    random_init: bool  # VGG19's ImageNet file is not available offline; speed does not depend on weights
    image_shape: tuple[int, int, int]
    batch_size: int
    lr_gen: float


CONFIGS = {
    "fmnist": BenchConfig("fmnist", "efficientnet-lite0", False, (1, 28, 28), 100, 1e-3),
    "cifar10": BenchConfig("cifar10", "vgg19", True, (3, 32, 32), 128, 1e-3),
}


@dataclass
class Variant:
    """One way of running a training step: its callable, the global flags around it, its FLOPs."""

    name: str
    step: Callable[[], object]
    batch_size: int
    flags: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    flops: int | None = None
    note: str = ""
    times: list[list[float]] = field(default_factory=list)  # one list of step times per round
    setup_s: float = 0.0  # compile time and other first-step cost, kept out of the medians


# --- the production step ---------------------------------------------------------------------------

@torch.no_grad()
def release_like_targets(public_map: PublicFeatureMap, image_shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """K x D class means of the map's features on random images plus Gaussian noise, like a release."""
    rng = torch.Generator().manual_seed(seed)
    device = next(public_map.buffers()).device
    n = 4 * NUM_CLASSES
    images = torch.rand(n, *image_shape, generator=rng).to(device)
    weights = class_weight_matrix(balanced_labels(n, NUM_CLASSES), NUM_CLASSES).to(device)
    return {name: weights @ f + RELEASE_NOISE * torch.randn(NUM_CLASSES, f.shape[1], generator=rng).to(device)
            for name, f in public_map(images).items()}


def make_trainer(cfg: BenchConfig, device: str, *, fused: bool = True) -> Trainer:
    fm = build_feature_map(cfg.encoder, random_init=cfg.random_init)
    public = PublicFeatureMap(fm, norm_bound=1.0, second_moment_bound=None, moments=1, fused=fused).to(device)
    config = TrainConfig(steps=1_000_000, batch_size=cfg.batch_size, lr_gen=cfg.lr_gen, device=device,
                         mixed_precision=True)
    return Trainer(config, public, release_like_targets(public, cfg.image_shape), image_shape=cfg.image_shape,
                   labelled=True)


# --- the published code's approach (cifar10 baseline) ----------------------------------------------

class PublishedVGGFeatures(nn.Module):
    """torchvision VGG19 as the published code drives it: the whole network runs, avgpool and the
    classifier included, and forward hooks on the 16 convs collect their (pre-ReLU) outputs."""

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg19

        self.net = vgg19(weights=None)
        for m in self.net.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # an in-place ReLU would overwrite the hooked pre-ReLU outputs
        self.net.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self._acts: list[torch.Tensor] = []
        for m in self.net.features:
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda _m, _i, out: self._acts.append(out))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._acts = []
        self.net((images - self.mean) / self.std)  # logits unused, as in the published code
        return torch.cat([a.flatten(1) for a in self._acts], dim=1)


class PublishedResNetGenerator(nn.Module):
    """The paper's ResNet generator (ngf 64, 32x32), plain NCHW as published."""

    def __init__(self, code_dim: int = 100, ngf: int = 64):
        super().__init__()
        ch = [ngf * 8, ngf * 4, ngf * 2, ngf]
        self.project = nn.ConvTranspose2d(code_dim, ch[0], 4, 1, 0)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"bn1": nn.BatchNorm2d(a), "conv1": nn.Conv2d(a, b, 3, padding=1, bias=False),
                           "bn2": nn.BatchNorm2d(b), "conv2": nn.Conv2d(b, b, 3, padding=1),
                           "skip": nn.Conv2d(a, b, 1)})
            for a, b in zip(ch[:-1], ch[1:]))
        self.out = nn.Sequential(nn.BatchNorm2d(ch[-1]), nn.ReLU(), nn.Conv2d(ch[-1], 3, 3, padding=1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.project(codes[:, :, None, None])
        for b in self.blocks:
            h = F.interpolate(F.relu(b["bn1"](x)), scale_factor=2, mode="nearest")
            h = b["conv2"](F.relu(b["bn2"](b["conv1"](h))))
            x = h + b["skip"](F.interpolate(x, scale_factor=2, mode="nearest"))
        return (torch.tanh(self.out(x)) + 1.0) * 0.5


class BaselineStep:
    """One published-style step: generate, hook features, norm bound, class means, squared distance."""

    def __init__(self, targets: torch.Tensor, batch_size: int, device: str, seed: int = 0):
        torch.manual_seed(seed)
        self.generator = PublishedResNetGenerator().to(device).train()
        self.features = PublishedVGGFeatures().to(device)
        self.targets = targets.to(device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.batch_size, self.device = batch_size, device
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        labels = torch.randperm(NUM_CLASSES, generator=self.rng)[balanced_labels(self.batch_size, NUM_CLASSES)]
        noise = torch.randn(self.batch_size, 100 - NUM_CLASSES, generator=self.rng)
        codes = torch.cat([F.one_hot(labels, NUM_CLASSES).float(), noise], dim=1).to(self.device)
        feats = self.features(self.generator(codes))
        feats = feats / feats.norm(dim=1, keepdim=True)  # norm bound C = 1
        onehot = F.one_hot(labels, NUM_CLASSES).float().T.to(self.device)
        means = (onehot @ feats) / onehot.sum(dim=1, keepdim=True)
        loss = ((means - self.targets) ** 2).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# --- variants --------------------------------------------------------------------------------------

@contextlib.contextmanager
def mkldnn_fp32_precision(value: str):
    """oneDNN's implicit reduced precision for fp32 convolutions and matmuls (global, restored after)."""
    conv, mm = torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul
    old = conv.fp32_precision, mm.fp32_precision
    conv.fp32_precision = mm.fp32_precision = value
    try:
        yield
    finally:
        conv.fp32_precision, mm.fp32_precision = old


@contextlib.contextmanager
def flush_denormal():
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class RemoteStep:
    """A variant's step in a child process started with extra environment variables.

    OpenMP's OMP_WAIT_POLICY and glibc's malloc settings are read when the process starts, so the
    only fair in-run comparison is a second process driven step by step from this one (one pipe
    round trip, well under a millisecond, per step); the parent's threads are idle meanwhile. The
    child applies the variant's in-process parts itself and reports the step's FLOPs when ready.
    """

    def __init__(self, cfg: BenchConfig, device: str, env: dict[str, str], parts: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", cfg.name,
                                      "--worker-parts", "+".join(parts) or "default", "--device", device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1])
        self.flops = int(self._expect("ready")[0])

    def _expect(self, word: str) -> list[str]:
        line = self.proc.stdout.readline().split()
        if not line or line[0] != word:
            raise RuntimeError(f"benchmark worker answered {line!r} instead of {word!r} (exit code {self.proc.poll()})")
        return line[1:]

    def __call__(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self._expect("ok")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def worker(config: str, parts: str, device: str) -> None:
    """Child side of RemoteStep: build the variant's step, then one step per 'step' line."""
    names = [p for p in parts.split("+") if p != "default"]
    for name in names:
        if name in CHILD_SETUP:
            CHILD_SETUP[name]()
    trainer, flags, _ = modified_trainer(CONFIGS[config], device, [p for p in names if p != "baseline"])
    step = trainer.train_step
    if "baseline" in names:
        step = BaselineStep(trainer.loss.targets["moment1"], CONFIGS[config].batch_size, device)
    with flags():
        print(f"ready {count_flops(step)}", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            with flags():
                step()
            synchronize(device)
            print("ok", flush=True)


def count_flops(step: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _channels_last(t: Trainer):
    t.generator.to(memory_format=torch.channels_last)
    t.feature_map.to(memory_format=torch.channels_last)
    return None, "generator and feature map weights channels_last"


def _compile(t: Trainer):
    t.generator.compile()
    t.feature_map.compile()
    return None, "generator.compile() and feature_map.compile(), steady state"


def _bf16(t: Trainer):
    t.amp_dtype = torch.bfloat16  # the Trainer's own autocast path, which it enables on cuda only
    return None, "Trainer autocast bf16 on the CPU"


# In-process modifiers of a fresh default trainer: (trainer) -> (flags context factory or None, note).
# They combine with "+" (e.g. channels_last+threads1), applied left to right.
MODIFIERS: dict[str, Callable[[Trainer], tuple]] = {
    "channels_last": _channels_last,
    "compile": _compile,
    "bf16": _bf16,
    "mkldnn_off": lambda t: (lambda: torch.backends.mkldnn.flags(enabled=False), "torch.backends.mkldnn.enabled = False"),
    "mkldnn_bf16": lambda t: (lambda: mkldnn_fp32_precision("bf16"), "mkldnn conv/matmul fp32_precision = 'bf16'"),
    "flush_denormal": lambda t: (flush_denormal, "torch.set_flush_denormal(True)"),
    "threads1": lambda t: (lambda: num_threads(1), "torch.set_num_threads(1)"),
}


def stacked(factories: list[Callable[[], contextlib.AbstractContextManager]]):
    def enter():
        stack = contextlib.ExitStack()
        for f in factories:
            stack.enter_context(f())
        return stack
    return enter


def option_name(value: str) -> str:
    """argparse type: a known option, or in-process modifiers, 'unfused' and environment options
    joined by '+' (e.g. channels_last+threads1, omp_passive+malloc_heap)."""
    parts = value.split("+")
    if len(parts) == 1 and value in ALL_OPTIONS:
        return value
    bad = [p for p in parts if p not in MODIFIERS and p not in FRESH_PROCESS and p not in ("unfused", "baseline")]
    if "baseline" in parts and not FRESH_PROCESS & set(parts):
        bad.append("baseline (combines only with " + ", ".join(sorted(FRESH_PROCESS)) + ")")
    if bad or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(
            f"unknown option {value!r} ({', '.join(bad) or 'a part repeats'}); choose from {', '.join(ALL_OPTIONS)} or join "
            f"{', '.join([*MODIFIERS, *FRESH_PROCESS])} and unfused with '+' (baseline with a process option)")
    return value


def modified_trainer(cfg: BenchConfig, device: str, parts: list[str]) -> tuple[Trainer, Callable, list[str]]:
    """A fresh trainer with the in-process parts applied: (trainer, flags context factory, notes)."""
    t = make_trainer(cfg, device, fused="unfused" not in parts)
    flags, notes = [], ["PublicFeatureMap(fused=False): batch norms kept"] if "unfused" in parts else []
    for part in parts:
        if part in MODIFIERS:
            ctx, note = MODIFIERS[part](t)
            flags += [ctx] if ctx is not None else []
            notes.append(note)
    return t, stacked(flags), notes


def build_variants(cfg: BenchConfig, device: str, options: list[str]) -> list[Variant]:
    """The default production step first (every ratio is against it), then the requested options."""
    default = make_trainer(cfg, device)
    fused = default.feature_map.raw is not default.feature_map.feature_map
    variants = [Variant("default", default.train_step, cfg.batch_size, flops=count_flops(default.train_step),
                        note="Trainer.train_step" + (", fused map" if fused else ""))]
    for name in options:
        parts = name.split("+")
        if name == "default":
            continue
        if device == "cuda" and CPU_ONLY & set(parts):
            logger.warning("option %s is CPU-only; skipped on cuda", name)
            continue
        if "unfused" in parts and cfg.encoder != "efficientnet-lite0":
            continue  # only Lite0 has a fused map
        if name == "baseline":
            if cfg.name != "cifar10":
                continue
            base = BaselineStep(default.loss.targets["moment1"], cfg.batch_size, device)
            variants.append(Variant("baseline", base, cfg.batch_size, flops=count_flops(base),
                                    note="published approach: full torchvision VGG19 + hooks, plain generator"))
        elif FRESH_PROCESS & set(parts):
            env = {k: v for p in parts if p in ENV_OPTIONS for k, v in ENV_OPTIONS[p].items()}
            local = [p for p in parts if p not in ENV_OPTIONS]
            if "baseline" in parts and cfg.name != "cifar10":
                continue
            remote = RemoteStep(cfg, device, env, local)
            notes = [f"in a child process with {' '.join(f'{k}={v}' for k, v in env.items()) or 'no extra environment'}"]
            notes += [f"{p}: {CHILD_SETUP[p].__name__}() first" if p in CHILD_SETUP else p for p in local]
            variants.append(Variant(name, remote, cfg.batch_size, flops=remote.flops, note="; ".join(notes)))
        else:
            t, flags, notes = modified_trainer(cfg, device, parts)
            flops = count_flops(t.train_step) if "unfused" in parts else variants[0].flops
            variants.append(Variant(name, t.train_step, cfg.batch_size, flops=flops, flags=flags,
                                    note="; ".join(notes)))
    return variants


# --- timing ----------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_rate(fn: Callable[[], object], flops: float, device: str, repeats: int) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return flops / median(times)


def measure_peaks(device: str, size: int, repeats: int = 5) -> dict[str, float]:
    """Median fp32 FLOP/s right now of (a) one size x size torch.matmul, the requested reference, and
    (b) a large channels-last 3x3 convolution (oneDNN on the CPU). On AMD CPUs torch.matmul goes to
    MKL, which does not use its fastest kernels there, so (b) is the closer bound for conv-heavy steps."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    x = torch.randn(128, 256, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    return {"matmul": _median_rate(lambda: a @ b, 2 * size**3, device, repeats),
            "conv": _median_rate(lambda: F.conv2d(x, w, padding=1), 2 * 128 * 256 * 256 * 9 * 16 * 16, device,
                                 repeats)}


def warm_up(variant: Variant, steps: int, device: str) -> None:
    """First steps (compilation, allocator, oneDNN primitive caches) are timed apart, not measured."""
    t = time.perf_counter()
    try:
        with variant.flags():
            for _ in range(steps):
                variant.step()
            synchronize(device)
    except Exception as exc:  # e.g. torch.compile without a working C++ toolchain
        variant.note = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        logger.warning("%s failed during warm-up and is skipped: %s", variant.name, exc)
        variant.step = None
    variant.setup_s = time.perf_counter() - t


def time_round(variant: Variant, steps: int, device: str) -> None:
    times = []
    with variant.flags():
        for _ in range(steps):
            t = time.perf_counter()
            variant.step()
            synchronize(device)
            times.append(time.perf_counter() - t)
    variant.times.append(times)


def profile_step(variant: Variant, device: str, top: int = 20) -> list[dict]:
    """torch.profiler's top ops by self time over two steps of the variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            variant.step()
        synchronize(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in prof.key_averages())
    return [{"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1e3 / 2, 2),
             "share": round(getattr(e, key) / total, 3), "calls_per_step": e.count // 2} for e in events]


def process_parts(name: str) -> list[str]:
    """The parts of a variant name that set up its process (environment, allocator), in order."""
    return [p for p in name.split("+") if p in FRESH_PROCESS]


def summarise(cfg: BenchConfig, variants: list[Variant], peak: float, conv_peak: float) -> list[dict]:
    base = variants[0]
    baseline = next((v for v in variants if v.name == "baseline" and v.times), None)
    rows = []
    for v in variants:
        if not v.times:
            rows.append({"config": cfg.name, "variant": v.name, "note": v.note})
            continue
        s = median([t for r in v.times for t in r])
        ratio = median([median(b) / median(r) for b, r in zip(base.times, v.times)])
        row = {"config": cfg.name, "variant": v.name, "encoder": cfg.encoder, "random_init": cfg.random_init,
               "batch_size": v.batch_size, "s_per_step": round(s, 4),
               "images_per_s": round(v.batch_size / s, 1), "ratio": round(ratio, 3),
               "gflop_per_step": round(v.flops / 1e9, 2) if v.flops else None,
               "gflop_per_s": round(v.flops / s / 1e9, 1) if v.flops else None,
               "peak_fraction": round(v.flops / s / peak, 3) if v.flops else None,
               "conv_peak_fraction": round(v.flops / s / conv_peak, 3) if v.flops else None,
               "setup_s": round(v.setup_s, 1), "timed_steps": sum(len(r) for r in v.times), "note": v.note}
        if baseline is not None and "baseline" not in v.name.split("+"):
            row["baseline_ratio"] = round(median([median(b) / median(r) for b, r in zip(baseline.times, v.times)]), 3)
        same_env = next((b for b in variants if b.times and b.name == "+".join(["baseline", *process_parts(v.name)])), None)
        if same_env is not None and process_parts(v.name) and "baseline" not in v.name.split("+"):
            row["same_process_baseline_ratio"] = round(
                median([median(b) / median(r) for b, r in zip(same_env.times, v.times)]), 3)
        rows.append(row)
    return rows


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows survive unless this run measured the same (device, env, config, variant)."""
    key = lambda r: (r.get("device"), r.get("env"), r["config"], r["variant"])  # noqa: E731
    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["fmnist", "cifar10"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    ap.add_argument("--options", nargs="+", type=option_name, default=list(ALL_OPTIONS),
                    help="variants to time besides default; in-process ones combine with '+', e.g. channels_last+threads1")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (cpu 2048, cuda 8192)")
    ap.add_argument("--profile", action="store_true", help="record torch.profiler's top ops of the default step")
    ap.add_argument("--out", default="training_step", help="result name under bench/results/")
    ap.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)  # child side of RemoteStep
    ap.add_argument("--worker-parts", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # noise from mkldnn.flags()
    if args.worker:
        worker(args.worker, args.worker_parts, args.device)
        return
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        ap.error("--steps, --repeats and --warmup must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch sees no CUDA device")
    peak_size = args.peak_size or (8192 if args.device == "cuda" else 2048)
    command, env = command_line(ENV_KEYS), environment(ENV_KEYS)

    rows, peaks, profiles = [], {}, {}
    for name in args.configs:
        cfg = CONFIGS[name]
        load_before = os.getloadavg()[0]
        variants = build_variants(cfg, args.device, args.options)
        try:
            for v in variants:
                warm_up(v, args.warmup, args.device)
            live = [v for v in variants if v.step is not None]
            peaks[name] = []
            for r in range(args.repeats):  # interleaved A B C, then B C A, ...: no variant always goes first
                peaks[name].append(measure_peaks(args.device, peak_size))
                for v in live[r % len(live):] + live[:r % len(live)]:
                    time_round(v, args.steps, args.device)
            if args.profile:
                profiles[name] = profile_step(variants[0], args.device)
        finally:
            for v in variants:
                if isinstance(v.step, RemoteStep):
                    v.step.close()
        load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
        peak = {k: median([p[k] for p in peaks[name]]) for k in ("matmul", "conv")}  # under this config's load
        for row in summarise(cfg, variants, peak["matmul"], peak["conv"]):
            rows.append({"device": args.device, "env": env_label(env), **row, "loadavg_1min": load,
                         "peak_gflop_per_s": round(peak["matmul"] / 1e9, 1),
                         "conv_peak_gflop_per_s": round(peak["conv"] / 1e9, 1), "command": command})
        del variants

    cols = ["config", "variant", "s_per_step", "images_per_s", "ratio", "baseline_ratio", "gflop_per_step",
            "gflop_per_s", "peak_fraction", "conv_peak_fraction", "setup_s", "note"]
    print(f"env: {env_label(env)}; fp32 peaks, GFLOP/s, median per config (matmul {peak_size}x{peak_size} / "
          "3x3 conv): " + ", ".join(f"{k} {median([p['matmul'] for p in v]) / 1e9:.1f} / "
                                    f"{median([p['conv'] for p in v]) / 1e9:.1f}" for k, v in peaks.items()))
    print(table(rows, cols))
    for name, top in profiles.items():
        print(f"\ntop ops, default {name} step:")
        print(table(top, list(top[0])))
    previous = common.RESULTS / f"{args.out}.json"  # read at call time, so tests can redirect it
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    all_rows = merge_rows(old.get("rows", []), rows)
    profiles = {**old.get("profiles", {}), **{f"{args.device}/{env_label(env)}/{k}": v for k, v in profiles.items()}}
    path = write_result(args.out, {
        "commands": list(dict.fromkeys(r["command"] for r in all_rows)),
        "columns": {"s_per_step": "median seconds per training step over all timed steps",
                    "ratio": "default s/step over this variant's, median over rounds (> 1: faster)",
                    "baseline_ratio": "ours / published-approach baseline, images per second",
                    "same_process_baseline_ratio": "this variant / baseline+<its process options> (same allocator and "
                                                   "environment for both), images per second",
                    "peak_fraction": "achieved FLOP/s over the fp32 matmul peak measured in the same rounds",
                    "conv_peak_fraction": "achieved FLOP/s over a large channels-last fp32 3x3 conv's FLOP/s, "
                                          "same rounds (oneDNN; MKL's matmul is slower on AMD CPUs)",
                    "setup_s": "warm-up wall time (compilation included), not in the medians"},
        "peaks": {"matmul": f"float32 {peak_size}x{peak_size} torch.matmul",
                  "conv": "float32 3x3 conv, 128x256x16x16 -> 256 channels, channels-last, padding 1"},
        "rows": all_rows, **({"profiles": profiles} if profiles else {}),
        **({"before": old["before"]} if "before" in old else {})})  # a recorded before/after comparison stays
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
