"""Training a generator to match a released embedding: pure torch, no files, no real data.

The loop draws class-balanced labels and codes from one seeded `torch.Generator`, so a run is a
function of (release, config); `Trainer.state_dict()` holds everything that trajectory depends on
(generator, optimisers, moving-average gaps, step, RNG state), and loading it continues the same
trajectory bit-for-bit on the CPU. Checkpoints are chosen by a criterion computed from the release
alone: the distance between the mean embedding of a fixed-seed sample and the released one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from mepf_core.errors import InvalidArgumentError
from mepf_core.generators import Generator, build_generator
from mepf_core.losses import MatchingLoss, class_weight_matrix
from mepf_core.train_config import DEVICES, LR_SCHEDULES, TrainConfig  # noqa: F401 (re-exported)
from mepf_core.precision import resolve_precision
from mepf_core.public_map import PublicFeatureMap

logger = logging.getLogger(__name__)

CRITERION_SEED = 2_147_483_647  # fixed codes for the selection criterion, independent of the run seed
CRITERION_CHUNK = 500  # images per no-grad forward pass when evaluating the criterion or sampling


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error, not a fallback."""
    if name not in DEVICES:
        raise InvalidArgumentError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError("device 'cuda' was requested but torch sees no CUDA device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: n labels, class counts differing by at most one."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def generate(generator: Generator, labels: torch.Tensor, *, seed: int, chunk: int = CRITERION_CHUNK) -> torch.Tensor:
    """Images (CPU, float32 in [0, 1]) for `labels`, codes from `seed`, batch norm in eval mode."""
    rng = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    try:
        return torch.cat([generator.generate(labels[i : i + chunk], rng).float().cpu() for i in range(0, len(labels), chunk)])
    finally:
        generator.train(was_training)


class WeightAverage:
    """Exponential moving average of a module's floating-point parameters and buffers (batch-norm
    running statistics included); integer buffers (batch counters) are copied. After each update,
    w_avg <- decay * w_avg + (1 - decay) * w. Starts as a copy of the module; never trained itself."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise InvalidArgumentError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        pairs = [*zip(self.module.parameters(), module.parameters()), *zip(self.module.buffers(), module.buffers())]
        for avg, live in pairs:
            if avg.is_floating_point():
                avg.lerp_(live.detach(), 1.0 - self.decay)
            else:
                avg.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


class Trainer:
    """A generator, its optimiser, the matching loss and the RNG: one resumable training run.

    With `config.ema_decay` > 0 the trainer also keeps a moving average of the generator's weights
    (`WeightAverage`); `sampling_generator` is then that average, which the criterion evaluates and
    sampling should use (saved under "generator_ema" in the state).
    """

    def __init__(
        self,
        config: TrainConfig,
        feature_map: PublicFeatureMap,
        targets: dict[str, np.ndarray | torch.Tensor],
        *,
        image_shape: tuple[int, int, int],
        labelled: bool,
    ):
        self.config = config
        self.device = resolve_device(config.device)
        k = int(np.shape(targets["moment1"])[0])
        if config.batch_size < k:
            raise InvalidArgumentError(f"batch_size must be >= the number of released rows ({k}: classes x cells per "
                                       f"class) to match every row, got {config.batch_size}")
        self.num_classes = k
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG left untouched
            torch.manual_seed(config.seed)
            self.generator = build_generator(image_shape, k, labelled, conv28_channels=config.conv28_channels).to(self.device)
        self.feature_map = feature_map.to(self.device)
        # channels-last weights: ~1.2x faster steps on CPU (measured side by side), fine on cuda
        self.generator.to(memory_format=torch.channels_last)
        self.feature_map.to(memory_format=torch.channels_last)
        self.ema = WeightAverage(self.generator, config.ema_decay) if config.ema_decay > 0 else None
        self.loss = MatchingLoss(
            {name: torch.as_tensor(t, dtype=torch.float32, device=self.device) for name, t in targets.items()},
            mode=config.loss,
            lr_mavg=config.lr_mavg,
        )
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr_gen, betas=(config.beta1, 0.999))
        self.rng = torch.Generator().manual_seed(config.seed)
        # bf16 autocast of the generator and encoder forward only (mepf_core.precision); None: float32
        self.amp_dtype = resolve_precision(config.precision, self.device, feature_map.spec.name)
        self.step = 0
        self.history: list[float] = []  # squared distance of each step's batch, step 1 first
        self.criteria: list[tuple[int, float]] = []  # (step, criterion) at each checkpoint
        self.best_criterion = math.inf
        self.best_step = 0
        self.train_seconds = 0.0  # wall time spent in training steps, all sessions together
        self._pending: list[torch.Tensor] = []

    # --- one step ---------------------------------------------------------------------------

    def _learning_rate(self, step: int) -> float:
        if self.config.lr_schedule == "constant":
            return self.config.lr_gen
        progress = min(step / self.config.steps, 1.0)
        return self.config.lr_gen * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _step_labels(self) -> torch.Tensor:
        """Class-balanced labels; which classes get the B mod K extra examples is drawn at random."""
        perm = torch.randperm(self.num_classes, generator=self.rng)
        return perm[balanced_labels(self.config.batch_size, self.num_classes)]

    def train_step(self) -> torch.Tensor:
        """One generator update; returns the batch's squared distance (detached, on the device)."""
        labels = self._step_labels()
        codes = self.generator.sample_codes(labels, self.rng)
        weights = class_weight_matrix(labels, self.num_classes).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate(self.step)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            outputs = self.feature_map.stage_outputs(self.generator(codes))
        loss, distance = self.loss(self.feature_map.class_means(outputs, weights))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.generator)
        self.step += 1
        return distance

    @property
    def sampling_generator(self) -> Generator:
        """The weights to sample from: the moving average when `ema_decay` > 0, else the trained ones."""
        return self.ema.module if self.ema is not None else self.generator

    def _flush_history(self) -> None:
        if self._pending:
            self.history.extend(torch.stack(self._pending).cpu().tolist())
            self._pending.clear()

    # --- the loop ---------------------------------------------------------------------------

    def train(
        self,
        until: int | None = None,
        on_checkpoint: Callable[["Trainer", bool], None] | None = None,
        progress: bool = True,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        """Train up to step `until` (default: config.steps), evaluating and calling
        `on_checkpoint(trainer, is_best)` every `checkpoint_every` steps and at the end.

        `progress`: a console (tqdm) bar. `on_step(step, until)`: called after every step (both ints,
        public), e.g. to update a progress display; it should be cheap (it is not throttled here)."""
        from tqdm.auto import tqdm

        until = self.config.steps if until is None else until
        if not isinstance(until, int) or until <= 0:
            raise InvalidArgumentError(f"until must be an integer > 0, got {until!r}")
        self.generator.train()
        bar = tqdm(total=until, initial=self.step, disable=not progress, desc="train", unit="step", mininterval=1.0)
        try:
            while self.step < until:
                start = time.perf_counter()
                self._pending.append(self.train_step())
                self.train_seconds += time.perf_counter() - start
                bar.update(1)
                if on_step is not None:
                    on_step(self.step, until)
                if len(self._pending) >= 25:
                    self._flush_history()
                    bar.set_postfix(loss=f"{self.history[-1]:.3e}", refresh=False)
                if self.step % self.config.checkpoint_every == 0 or self.step == until:
                    self._flush_history()
                    is_best = self.evaluate()
                    if on_checkpoint is not None:
                        on_checkpoint(self, is_best)
        finally:
            self._flush_history()
            bar.close()

    # --- selection criterion (release only) -------------------------------------------------

    @torch.no_grad()
    def criterion(self) -> float:
        """Squared distance between a fixed-seed sample's class means and the released means."""
        labels = balanced_labels(self.config.eval_samples, self.num_classes)
        rng = torch.Generator().manual_seed(CRITERION_SEED)
        sums = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in self.loss.targets.items()}
        counts = torch.zeros(self.num_classes, dtype=torch.float64, device=self.device)
        generator = self.sampling_generator
        was_training = generator.training
        generator.eval()
        try:
            for i in range(0, len(labels), CRITERION_CHUNK):
                chunk = labels[i : i + CRITERION_CHUNK]
                onehot = torch.nn.functional.one_hot(chunk, self.num_classes).to(self.device, torch.float64).T
                features = self.feature_map(generator.generate(chunk, rng))
                for name in sums:
                    sums[name] += onehot @ features[name].double()
                counts += onehot.sum(dim=1)
        finally:
            generator.train(was_training)
        return float(sum(((sums[n] / counts[:, None] - self.loss.targets[n].double()) ** 2).sum() for n in sums))

    def evaluate(self) -> bool:
        """Record the criterion at the current step; True when it is the best so far."""
        value = self.criterion()
        self.criteria.append((self.step, value))
        is_best = value < self.best_criterion
        if is_best:
            self.best_criterion, self.best_step = value, self.step
        return is_best

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        self._flush_history()
        return {
            **({"generator_ema": self.ema.state_dict()} if self.ema is not None else {}),
            "step": self.step,
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "rng": self.rng.get_state(),
            "history": list(self.history),
            "criteria": [list(c) for c in self.criteria],
            "best_criterion": self.best_criterion,
            "best_step": self.best_step,
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        if (self.ema is not None) != ("generator_ema" in state):
            raise InvalidArgumentError("the state's weight average does not match ema_decay "
                                       f"{self.config.ema_decay} (a state saved with another setting)")
        if self.ema is not None:
            self.ema.load_state_dict(state["generator_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        self.rng.set_state(state["rng"])
        self.step = int(state["step"])
        self.history = [float(v) for v in state["history"]]
        self.criteria = [(int(s), float(v)) for s, v in state["criteria"]]
        self.best_criterion = float(state["best_criterion"])
        self.best_step = int(state["best_step"])
        self.train_seconds = float(state["train_seconds"])
        self._pending = []


def build_trainer(
    config: TrainConfig,
    feature_map: PublicFeatureMap,
    targets: dict[str, np.ndarray | torch.Tensor],
    *,
    image_shape: tuple[int, int, int],
    labelled: bool,
) -> Trainer:
    """The Trainer `mepf train` runs: the process prepared for training first, then `Trainer(...)`.

    Production (`tasks.public._release_trainer`) and bench/bench_training_step.py both build their
    trainer here, so the benchmark times what `mepf train` runs. The process settings
    (`mepf_core.allocator.prepare_training_process`: on the CPU, glibc keeps freed memory) are
    process-wide and stay for the life of the process. Arguments and errors as `Trainer`.
    """
    from mepf_core.allocator import prepare_training_process

    prepare_training_process(resolve_device(config.device))
    return Trainer(config, feature_map, targets, image_shape=image_shape, labelled=labelled)
