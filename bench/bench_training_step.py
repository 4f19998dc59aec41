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
zeroed pages every step; the training task's own `keep_freed_memory()`), and the allocators:
`default` runs under tcmalloc where `mepf` preloads it (mepf_core.allocator: every production variant
does unless it names another), `glibc` is the production step under glibc's malloc keeping freed
memory (what `mepf` runs where tcmalloc is not installed), `jemalloc` a trial. For Lite0 also the
unfused (batch norms kept) public map; for VGG19 `plain_autograd`, the encoder's stages as plain
nn.Sequential and its class means by plain autograd (before issue 16's lean backward); `plain_generator`, the
ResNet generator's BN-ReLU-convs by plain autograd (ReLU outputs kept for backward, before
`lean_autograd.bn_relu_conv`); `all_feature_grads`, the class means returning every stage's feature
gradient at once (before they were handed to the lean stages one at a time); mmap4/8/16/32: glibc
serves blocks >= N MiB with their own mmap again after build_trainer (less heap fragmentation, page faults);
`arena1`: glibc's M_ARENA_MAX = 1 set first thing in the child (every thread allocates from the main heap). Options combine with '+', e.g. channels_last+threads1,
omp_passive+malloc_heap, or baseline+malloc_heap (the baseline under the same allocator). Variants run interleaved in rounds
(A B C, then B C A, ...) because the machine is shared: every s/step is a median over all timed steps,
every ratio a median over rounds. The fp32 matmul peak is measured in each round too (with a large
channels-last conv as a second reference: on AMD CPUs MKL's matmul reaches only about half of what
oneDNN's convolutions do), and FLOPs per step are counted with `FlopCounterMode` over one
forward+backward step of each model.

    python bench/bench_training_step.py [--configs fmnist cifar10] [--steps 20] [--repeats 3]
        [--warmup 3] [--options default baseline unfused plain_autograd channels_last compile bf16 mkldnn_off
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
from mepf_core.allocator import ALLOCATOR_ENV, keep_freed_memory, tcmalloc_env  # noqa: E402
from mepf_core.precision import cpu_has_native_bf16  # noqa: E402
from mepf_core.encoders import build_feature_map  # noqa: E402
from mepf_core.losses import class_weight_matrix  # noqa: E402
from mepf_core.public_map import PublicFeatureMap  # noqa: E402
from mepf_core.training import TrainConfig, Trainer, balanced_labels, build_trainer  # noqa: E402

logger = logging.getLogger("bench_training_step")

NUM_CLASSES = 10
RELEASE_NOISE = 1e-3  # per-coordinate std of the fake release's noise (eps ~1, n ~ 6,000 per class)
ALL_OPTIONS = ("default", "baseline", "baseline+malloc_heap", "baseline+tcmalloc", "m1_and_m2", "unfused", "plain_autograd", "plain_generator", "all_feature_grads",
               "channels_last",
               "compile", "bf16", "fp32", "mkldnn_off", "mkldnn_bf16", "flush_denormal", "threads1", "omp_passive",
               "glibc", "system_malloc")
CPU_ONLY = {"arena1", "thp", "jemalloc", "tcmalloc", "glibc", "mkldnn_off", "mkldnn_bf16", "flush_denormal", "threads1", "omp_passive", "malloc_heap", "system_malloc"}
# Options that need a fresh process: the environment of the child that runs the variant's steps.
ENV_OPTIONS = {
    "omp_passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # idle OpenMP threads sleep instead of spinning
    # PyTorch's CPU allocator aligns blocks >= 2 MiB to 2 MiB and madvises them MADV_HUGEPAGE: page
    # faults of fresh (mmap'd) blocks fill 2 MiB pages instead of 4 KiB ones (issue 16 trial)
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    # Another malloc for the whole child, preloaded ahead of glibc's. tcmalloc is what `mepf` runs under
    # where installed (mepf_core.allocator.tcmalloc_env): production variants get it implicitly, and
    # baseline+tcmalloc is the published code under it. jemalloc (Debian libjemalloc2): an issue 16 trial.
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2", ALLOCATOR_ENV: "system"},
    # the production step under glibc's malloc (keep_freed_memory): what `mepf` ran before tcmalloc
    "glibc": {ALLOCATOR_ENV: "system"},
    # glibc serves every allocation from its heap and keeps freed memory: no fresh zeroed pages
    # (page faults) for each step's large activation tensors
}
# Options that change the process itself, applied first thing in the child: production's own calls.
CHILD_SETUP: dict[str, Callable[[], object]] = {
    # glibc keeps freed memory (the training task's keep_freed_memory), so large per-step tensors
    # do not page-fault fresh zeroed pages every step. Production (build_trainer) already does this;
    # the option exists to put the published-code baseline under the same allocator (baseline+malloc_heap)
    "malloc_heap": keep_freed_memory,
    # one malloc arena for all threads (M_ARENA_MAX = 1): a heap-fragmentation trial of issue 16
    "arena1": lambda: _mallopt(-8, 1),
}
# the production trainer built without build_trainer's process settings (glibc's default allocator)
PLAIN_PROCESS = {"system_malloc"}
FRESH_PROCESS = ENV_OPTIONS.keys() | CHILD_SETUP.keys() | PLAIN_PROCESS
ENV_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "MALLOC_MMAP_MAX_",
            "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


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
    rss: dict = field(default_factory=dict)  # the child's resident memory, MiB: phases and peak


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


def make_trainer(cfg: BenchConfig, device: str, *, fused: bool = True, precision: str | None = None,
                 moments: int = 1, production_process: bool = True) -> Trainer:
    """The trainer `mepf train` would build for this configuration: `build_trainer` (the production
    function, which also applies the process settings) on release-like targets, TrainConfig's
    defaults except steps, batch size, learning rate and device. precision None: TrainConfig's
    default ("auto"). production_process False: `Trainer(...)` alone (variant system_malloc)."""
    fm = build_feature_map(cfg.encoder, random_init=cfg.random_init)
    public = PublicFeatureMap(fm, norm_bound=1.0, second_moment_bound=1.0 if moments == 2 else None, moments=moments,
                              fused=fused).to(device)
    overrides = {} if precision is None else {"precision": precision}
    config = TrainConfig(steps=1_000_000, batch_size=cfg.batch_size, lr_gen=cfg.lr_gen, device=device, **overrides)
    build = build_trainer if production_process else Trainer
    return build(config, public, release_like_targets(public, cfg.image_shape), image_shape=cfg.image_shape,
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

    def __init__(self, targets: torch.Tensor, batch_size: int, device: str, seed: int = 0,
                 features: PublishedVGGFeatures | None = None):
        torch.manual_seed(seed)
        self.generator = PublishedResNetGenerator().to(device).train()
        self.features = features if features is not None else PublishedVGGFeatures().to(device)
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


def make_baseline(cfg: BenchConfig, device: str, seed: int = 0) -> BaselineStep:
    """The published-approach step with release-like targets from its own (random) VGG19: class means
    of the norm-bounded features of 4K random images plus release-sized noise."""
    torch.manual_seed(seed)
    features = PublishedVGGFeatures().to(device)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        images = torch.rand(4 * NUM_CLASSES, *cfg.image_shape, generator=rng).to(device)
        f = features(images)
        f = f / f.norm(dim=1, keepdim=True)
        weights = class_weight_matrix(balanced_labels(len(images), NUM_CLASSES), NUM_CLASSES).to(device)
        targets = weights @ f + RELEASE_NOISE * torch.randn(NUM_CLASSES, f.shape[1], generator=rng).to(device)
    return BaselineStep(targets, cfg.batch_size, device, seed, features=features)


# --- memory ----------------------------------------------------------------------------------------

def rss_mib() -> dict[str, float]:
    """This process's resident memory now and its peak so far (VmRSS, VmHWM), MiB; {} off Linux."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {"now": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "peak": round(int(fields["VmHWM"].split()[0]) / 1024, 1)}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_breakdown(trainer: Trainer) -> dict[str, float]:
    """Where a training step's memory goes, MiB: weights, optimiser states, the loss's K x D tensors,
    the tensors autograd saves for backward in one step (unique storages, weights excluded) and the
    largest of them. Runs one extra training step."""
    params = {p.data_ptr() for m in (trainer.generator, trainer.feature_map) for p in m.parameters()}
    params |= {b.data_ptr() for b in trainer.feature_map.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in params and t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    loss = trainer.loss
    loss_tensors = [*loss.targets.values(), *loss.gaps.values()]
    if loss.optimizer is not None:
        loss_tensors += [v for st in loss.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"generator_weights": mib(_nbytes(trainer.generator.parameters())),
            "encoder_weights": mib(_nbytes([*trainer.feature_map.parameters(), *trainer.feature_map.buffers()])),
            "generator_adam_state": mib(_nbytes(v for st in trainer.optimizer.state.values() for v in st.values()
                                                if torch.is_tensor(v))),
            "loss_targets_gaps_adam": mib(_nbytes(loss_tensors)),
            "saved_for_backward": mib(sum(saved.values())),
            "largest_saved": mib(max(saved.values(), default=0)),
            "saved_tensors": len(saved)}


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
    """A variant's step in its own child process, driven step by step over a pipe.

    Every variant runs in a fresh process: production's process settings (`build_trainer` makes glibc
    keep freed memory) and OpenMP's OMP_WAIT_POLICY are process-wide and read or applied once, and
    each variant's peak resident memory must be its own. One pipe round trip (well under a
    millisecond) per step; the parent's threads are idle meanwhile. The child builds the variant,
    counts one step's FLOPs and reports them with its note when ready.
    """

    def __init__(self, cfg: BenchConfig, device: str, env: dict[str, str], parts: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", cfg.name,
                                      "--worker-parts", "+".join(parts) or "default", "--device", device],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1])
        ready = self._ask(None, "ready")
        self.flops, self.note = int(ready["flops"]), ready["note"]

    def _ask(self, command: str | None, word: str):
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        head, _, body = line.partition(" ")
        if head.strip() != word:
            raise RuntimeError(f"benchmark worker answered {line!r} instead of {word!r} (exit code {self.proc.poll()})")
        return json.loads(body) if body.strip() else None

    def __call__(self) -> None:
        self._ask("step", "ok")

    def rss(self) -> dict:
        return self._ask("rss", "rss")

    def memory(self) -> dict:
        return self._ask("memory", "memory")

    def profile(self) -> list[dict]:
        return self._ask("profile", "profile")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def worker(config: str, parts: str, device: str) -> None:
    """Child side of RemoteStep: build the variant's step, then answer one command per line
    (step, rss, memory, profile) until stdin closes."""
    names = [p for p in parts.split("+") if p != "default"]
    for name in names:
        if name in CHILD_SETUP:
            CHILD_SETUP[name]()
    phases = {"imports": rss_mib().get("now")}
    cfg = CONFIGS[config]
    trainer = None
    if "baseline" in names:
        step, flags = make_baseline(cfg, device), contextlib.nullcontext
        notes = ["published approach: full torchvision VGG19 + hooks, plain generator"]
    else:
        trainer, flags, notes = modified_trainer(cfg, device, names)
        step = trainer.train_step
        notes.insert(0, f"build_trainer (production), autocast {trainer.amp_dtype or 'off'}"
                     if "system_malloc" not in names else "Trainer(...) without build_trainer's process settings")
    notes += [f"{p}: {CHILD_SETUP[p].__name__}() first" for p in names if p in CHILD_SETUP]
    phases["built"] = rss_mib().get("now")
    with flags():
        flops = count_flops(step)
    phases["after_first_step"] = rss_mib().get("now")
    print("ready " + json.dumps({"flops": flops, "note": "; ".join(notes)}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            with flags():
                step()
            synchronize(device)
            print("ok", flush=True)
        elif command == "rss":
            print("rss " + json.dumps({**phases, "peak": rss_mib().get("peak")}), flush=True)
        elif command == "memory":
            print("memory " + json.dumps(memory_breakdown(trainer) if trainer is not None else {}), flush=True)
        elif command == "profile":
            with flags():
                print("profile " + json.dumps(profile_step(step, device)), flush=True)


def count_flops(step: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _channels_last(t: Trainer):
    t.generator.to(memory_format=torch.channels_last)
    t.feature_map.to(memory_format=torch.channels_last)
    return None, "generator and feature map weights channels_last"


def _plain_autograd(t: Trainer):
    """The step before issue 16's lean backward (mepf_core/lean_autograd.py): the encoder's VGG stages
    as plain nn.Sequential of the same layers (autograd saves every ReLU output, pool input and pool
    index again) and the class means differentiated by autograd (matrix product, norm backward and
    their sum as separate buffers). Same values; only what backward keeps and allocates differs."""
    from mepf_core import public_map
    from mepf_core.lean_autograd import FrozenVGGStage

    stages = t.feature_map.raw.stages
    swapped = 0
    for i, stage in enumerate(stages):
        if isinstance(stage, FrozenVGGStage):
            stages[i] = nn.Sequential(*stage)
            swapped += 1

    def autograd_class_means(outputs, weights, bound, norms):  # noqa: ARG001 - recomputed with autograd
        return public_map._scaled_means(outputs, weights * public_map._bound_scale(public_map._joint_norm(outputs), bound))

    public_map.scaled_class_means = autograd_class_means  # this child process only
    return None, (f"{swapped} encoder stages as plain nn.Sequential, class means by plain autograd "
                  "(before issue 16's lean backward)")


def _mallopt(param: int, value: int) -> bool:
    """glibc mallopt(param, value) in this process; True when glibc accepted it."""
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1


def _plain_generator(t: Trainer):
    """The generator before issue 16's lean BN-ReLU-conv (mepf_core.lean_autograd.bn_relu_conv): each
    batch norm, ReLU and conv by plain autograd, which keeps the ReLU outputs for backward. Same values."""
    from mepf_core import generators

    def plain_bn_relu_conv(x, bn, weight, bias=None, *, stride=1, padding=0, transposed=False):
        conv = F.conv_transpose2d if transposed else F.conv2d
        return conv(F.relu(bn(x)), weight, bias, stride=stride, padding=padding)

    generators.bn_relu_conv = plain_bn_relu_conv  # this child process only
    return None, "generator's BN-ReLU-convs by plain autograd (before issue 16's lean generator backward)"


def _all_feature_grads(t: Trainer):
    """The class means' backward before the hand-over to the lean stages: every stage's B x D_l feature
    gradient returned at once and summed by autograd. Same values."""
    from mepf_core import lean_autograd

    lean_autograd._consumers = lambda outputs: [None] * len(outputs)  # this child process only
    return None, "class means return every feature gradient at once (before the hand-over to the stages)"


def _mmap_threshold(mib: int) -> Callable[[Trainer], tuple]:
    """Modifier: after build_trainer's allocator setting, let glibc serve blocks of >= `mib` MiB with
    their own mmap again (returned to the system on free: no heap fragmentation from them, but fresh
    zeroed pages at each allocation); smaller blocks stay in the kept heap."""
    def apply(_t: Trainer):
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = mallopt(-3, mib * 2**20) == 1 and mallopt(-4, 65536) == 1  # M_MMAP_THRESHOLD, M_MMAP_MAX
        return None, f"glibc mmap threshold {mib} MiB after build_trainer (applied: {ok})"
    return apply


def _compile(t: Trainer):
    t.generator.compile()
    t.feature_map.compile()
    return None, "generator.compile() and feature_map.compile(), steady state"


# In-process modifiers of a freshly built trainer: (trainer) -> (flags context factory or None, note).
# They combine with "+" (e.g. channels_last+threads1), applied left to right.
MODIFIERS: dict[str, Callable[[Trainer], tuple]] = {
    "channels_last": _channels_last,
    "plain_autograd": _plain_autograd,
    "plain_generator": _plain_generator,
    "all_feature_grads": _all_feature_grads,
    **{f"mmap{mib}": _mmap_threshold(mib) for mib in (4, 8, 16, 32)},
    "compile": _compile,
    "mkldnn_off": lambda t: (lambda: torch.backends.mkldnn.flags(enabled=False), "torch.backends.mkldnn.enabled = False"),
    "mkldnn_bf16": lambda t: (lambda: mkldnn_fp32_precision("bf16"), "mkldnn conv/matmul fp32_precision = 'bf16'"),
    "flush_denormal": lambda t: (flush_denormal, "torch.set_flush_denormal(True)"),
    "threads1": lambda t: (lambda: num_threads(1), "torch.set_num_threads(1)"),
}
# Parts that change how the trainer is built (TrainConfig / PublicFeatureMap arguments)
BUILD_PARTS = {
    "unfused": "PublicFeatureMap(fused=False): batch norms kept",
    "bf16": "TrainConfig(precision='bf16')",
    "fp32": "TrainConfig(precision='fp32')",
    "m1_and_m2": "moments=2 (first and second moments, D x 2)",
}


def stacked(factories: list[Callable[[], contextlib.AbstractContextManager]]):
    def enter():
        stack = contextlib.ExitStack()
        for f in factories:
            stack.enter_context(f())
        return stack
    return enter


def option_name(value: str) -> str:
    """argparse type: a known option, or modifiers, build parts and process options joined by '+'
    (e.g. channels_last+threads1, bf16+m1_and_m2, omp_passive+bf16); baseline only with process options."""
    parts = value.split("+")
    if value in ALL_OPTIONS:
        return value
    bad = [p for p in parts if p not in MODIFIERS and p not in FRESH_PROCESS and p not in BUILD_PARTS
           and p != "baseline"]
    if "baseline" in parts and set(parts) - FRESH_PROCESS - {"baseline"}:
        bad.append("baseline (combines only with " + ", ".join(sorted(FRESH_PROCESS)) + ")")
    if "bf16" in parts and "fp32" in parts:
        bad.append("bf16 with fp32")
    if bad or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(
            f"unknown option {value!r} ({', '.join(bad) or 'a part repeats'}); choose from {', '.join(ALL_OPTIONS)} or join "
            f"{', '.join([*MODIFIERS, *BUILD_PARTS, *FRESH_PROCESS])} with '+' (baseline with a process option)")
    return value


def modified_trainer(cfg: BenchConfig, device: str, parts: list[str]) -> tuple[Trainer, Callable, list[str]]:
    """A fresh production trainer with the variant's parts applied: (trainer, flags context factory, notes)."""
    precision = "bf16" if "bf16" in parts else "fp32" if "fp32" in parts else None
    t = make_trainer(cfg, device, fused="unfused" not in parts, precision=precision,
                     moments=2 if "m1_and_m2" in parts else 1, production_process="system_malloc" not in parts)
    flags, notes = [], [BUILD_PARTS[p] for p in parts if p in BUILD_PARTS]
    for part in parts:
        if part in MODIFIERS:
            ctx, note = MODIFIERS[part](t)
            flags += [ctx] if ctx is not None else []
            notes.append(note)
    return t, stacked(flags), notes


def build_variants(cfg: BenchConfig, device: str, options: list[str]) -> list[Variant]:
    """The default production step first (every ratio is against it), then the requested options,
    each in its own child process."""
    variants = []
    for name in ["default", *[o for o in options if o != "default"]]:
        parts = [p for p in name.split("+") if p != "default"]
        if device == "cuda" and CPU_ONLY & set(parts):
            logger.warning("option %s is CPU-only; skipped on cuda", name)
            continue
        if "unfused" in parts and cfg.encoder != "efficientnet-lite0":
            continue  # only Lite0 has a fused map
        if ("plain_autograd" in parts or "all_feature_grads" in parts) and cfg.encoder != "vgg19":
            continue  # only VGG19 has lean stages
        if "plain_generator" in parts and cfg.image_shape[1] == 28:
            continue  # only the ResNet generator (32x32, 64x64) has lean BN-ReLU-convs
        if "baseline" in parts and cfg.name != "cifar10":
            continue  # the published VGG19 approach
        parts = process_parts(name)
        env = {k: v for p in parts if p in ENV_OPTIONS for k, v in ENV_OPTIONS[p].items()}
        try:
            remote = RemoteStep(cfg, device, env, [p for p in parts if p not in ENV_OPTIONS])
        except RuntimeError as exc:  # e.g. torch.compile without a working C++ toolchain
            logger.warning("%s failed to start and is skipped: %s", name, exc)
            variants.append(Variant(name, None, cfg.batch_size, note=f"skipped: {exc}"[:240]))
            continue
        where = " ".join(f"{k}={v}" for k, v in env.items())
        note = remote.note + (f"; child started with {where}" if where else "")
        variants.append(Variant(name, remote, cfg.batch_size, flops=remote.flops, note=note))
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


def profile_step(step: Callable[[], object], device: str, top: int = 20) -> list[dict]:
    """torch.profiler's top ops by self time over two steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        synchronize(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in prof.key_averages())
    return [{"op": e.key, "self_ms_per_step": round(getattr(e, key) / 1e3 / 2, 2),
             "share": round(getattr(e, key) / total, 3), "calls_per_step": e.count // 2} for e in events]


ALLOCATOR_PARTS = {"tcmalloc", "jemalloc", "glibc", "system_malloc", "malloc_heap"}


def process_parts(name: str) -> list[str]:
    """The variant's parts with the allocator `mepf` itself would run under made explicit: a production
    variant that names no allocator gets "tcmalloc" where `mepf` preloads it (tcmalloc_env of this
    environment), so `default` times exactly what `mepf train` runs. The baseline keeps glibc's
    default unless it names one (the published code)."""
    parts = [p for p in name.split("+") if p != "default"]
    if "baseline" in parts or ALLOCATOR_PARTS & set(parts) or tcmalloc_env(os.environ) is None:
        return parts
    return [*parts, "tcmalloc"]


def allocator_of(name: str) -> str:
    """The variant's allocator: 'tcmalloc' or 'jemalloc' (preloaded), 'heap' (glibc keeping freed
    memory: production without tcmalloc, glibc, or the baseline with malloc_heap), or 'system' (glibc's
    default: the published code, system_malloc)."""
    parts = process_parts(name)
    for preloaded in ("tcmalloc", "jemalloc"):
        if preloaded in parts:
            return preloaded
    if "baseline" in parts:
        return "heap" if "malloc_heap" in parts else "system"
    return "system" if "system_malloc" in parts else "heap"


def same_process_baseline(name: str) -> str:
    """The baseline variant under the same allocator and environment as variant `name`."""
    parts = [p for p in name.split("+") if p in ENV_OPTIONS and p not in ALLOCATOR_PARTS]
    allocator = {"heap": ["malloc_heap"], "system": []}.get(allocator_of(name), [allocator_of(name)])
    return "+".join(["baseline", *parts, *allocator])


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
        row.update({f"rss_{k}_mib": val for k, val in v.rss.items()})
        same_env = next((b for b in variants if b.times and b.name == same_process_baseline(v.name)), None)
        if same_env is not None and "baseline" not in v.name.split("+"):
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
    ap.add_argument("--memory", action="store_true",
                    help="record where each production variant's memory goes (weights, optimiser, loss, saved "
                         "activations; one extra step each) under `memory` in the JSON")
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

    rows, peaks, profiles, memory = [], {}, {}, {}
    for name in args.configs:
        cfg = CONFIGS[name]
        load_before = os.getloadavg()[0]
        variants = build_variants(cfg, args.device, args.options)
        remotes = [v.step for v in variants if v.step is not None]
        try:
            for v in variants:
                warm_up(v, args.warmup, args.device)
            live = [v for v in variants if v.step is not None]
            peaks[name] = []
            for r in range(args.repeats):  # interleaved A B C, then B C A, ...: no variant always goes first
                peaks[name].append(measure_peaks(args.device, peak_size))
                for v in live[r % len(live):] + live[:r % len(live)]:
                    time_round(v, args.steps, args.device)
            for v in live:
                v.rss = v.step.rss()  # peak before the extra steps of --memory / --profile
            if args.memory:
                for v in live:
                    if "baseline" not in v.name.split("+"):
                        memory[f"{args.device}/{name}/{v.name}"] = {**v.step.memory(), "rss_mib": v.rss}
            if args.profile and variants[0].step is not None:
                profiles[name] = variants[0].step.profile()
        finally:
            for remote in remotes:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    remote.close()
        load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
        peak = {k: median([p[k] for p in peaks[name]]) for k in ("matmul", "conv")}  # under this config's load
        for row in summarise(cfg, variants, peak["matmul"], peak["conv"]):
            rows.append({"device": args.device, "env": env_label(env), **row, "loadavg_1min": load,
                         "peak_gflop_per_s": round(peak["matmul"] / 1e9, 1),
                         "conv_peak_gflop_per_s": round(peak["conv"] / 1e9, 1), "command": command})
        del variants

    cols = ["config", "variant", "s_per_step", "images_per_s", "ratio", "baseline_ratio", "same_process_baseline_ratio",
            "rss_peak_mib", "gflop_per_step", "gflop_per_s", "conv_peak_fraction", "setup_s", "note"]
    print(f"env: {env_label(env)}; fp32 peaks, GFLOP/s, median per config (matmul {peak_size}x{peak_size} / "
          "3x3 conv): " + ", ".join(f"{k} {median([p['matmul'] for p in v]) / 1e9:.1f} / "
                                    f"{median([p['conv'] for p in v]) / 1e9:.1f}" for k, v in peaks.items()))
    print(table(rows, cols))
    for name, parts in memory.items():
        print(f"\nmemory, MiB, {name}: " + ", ".join(f"{k} {v}" for k, v in parts.items()))
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
                    "same_process_baseline_ratio": "this variant / the baseline under the same allocator and "
                                                   "environment (baseline+malloc_heap for production variants), "
                                                   "images per second",
                    "rss_peak_mib": "the variant's child process: peak resident memory (VmHWM) after warm-up and the "
                                    "timed steps, MiB; rss_imports/built/after_first_step_mib: VmRSS at those points",
                    "peak_fraction": "achieved FLOP/s over the fp32 matmul peak measured in the same rounds",
                    "conv_peak_fraction": "achieved FLOP/s over a large channels-last fp32 3x3 conv's FLOP/s, "
                                          "same rounds (oneDNN; MKL's matmul is slower on AMD CPUs)",
                    "setup_s": "warm-up wall time (compilation included), not in the medians"},
        "peaks": {"matmul": f"float32 {peak_size}x{peak_size} torch.matmul",
                  "conv": "float32 3x3 conv, 128x256x16x16 -> 256 channels, channels-last, padding 1"},
        "rows": all_rows, **({"profiles": profiles} if profiles else {}),
        **({"memory": {**old.get("memory", {}), **memory}} if memory or "memory" in old else {}),
        "cpu_native_bf16": cpu_has_native_bf16(),
        **({"before": old["before"]} if "before" in old else {})})  # a recorded before/after comparison stays
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
