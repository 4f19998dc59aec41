"""Downstream accuracy: train a classifier on (synthetic) images, test it on a real test split.

Each classifier is a function ``(train_x, train_y, test_x, test_y, *, num_classes, seed) -> accuracy``
on validated uint8 N x C x H x W images, registered in ``CLASSIFIERS``. Settings are sized for CPUs:
they measure whether synthetic data carries class information, not the best reachable accuracy.
Everything is seeded; the torch models train in a forked RNG so callers' random state is untouched.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mepf_core.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

ClassifierFn = Callable[..., float]


# --- scikit-learn on flattened pixels ----------------------------------------------------------


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def _fit_quietly(model, x: np.ndarray, y: np.ndarray, name: str):
    """Fit, logging (not printing) sklearn's non-convergence warning: capped iterations are intended."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            logger.info("%s stopped at its iteration cap before converging", name)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def logreg_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, seed: int,
                    max_iter: int = 200) -> float:
    """Multinomial logistic regression (L-BFGS) on pixels in [0, 1]."""
    from sklearn.linear_model import LogisticRegression

    model = _fit_quietly(LogisticRegression(max_iter=max_iter, random_state=seed),
                         _flat(train_x), train_y, "logreg")
    return float((model.predict(_flat(test_x)) == test_y).mean())


def mlp_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, seed: int,
                 hidden: tuple[int, ...] = (256,), max_iter: int = 100) -> float:
    """One-hidden-layer MLP (Adam, early stopping on a 10% split) on pixels in [0, 1]."""
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=hidden, early_stopping=True, max_iter=max_iter,
                          random_state=seed)
    model = _fit_quietly(model, _flat(train_x), train_y, "mlp")
    return float((model.predict(_flat(test_x)) == test_y).mean())


# --- torch models -------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Two 3x3 conv layers (32, 64 channels, each followed by 2x2 max-pool) and two FC layers."""

    def __init__(self, channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 for 32x32 images (CIFAR-10); ``width`` scales all channel counts."""

    def __init__(self, channels: int, num_classes: int, width: int = 64):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            _conv_bn(channels, w),
            _conv_bn(w, 2 * w, pool=True), _Residual(2 * w),
            _conv_bn(2 * w, 4 * w, pool=True),
            _conv_bn(4 * w, 8 * w, pool=True), _Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0)


def _train_and_test(model: nn.Module, train_x, train_y, test_x, test_y, *, seed: int, epochs: int,
                    batch_size: int, lr: float, device: str) -> float:
    """Adam on cross-entropy for a fixed number of epochs, then accuracy on the test split."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    model = model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = _to_tensor(train_x), torch.from_numpy(train_y.astype(np.int64))
    shuffler = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=shuffler)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
                continue  # batch norm cannot train on a single example
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test_x), 512):
            batch = _to_tensor(test_x[start : start + 512]).to(device)
            predicted = model(batch).argmax(1).cpu().numpy()
            correct += int((predicted == test_y[start : start + 512]).sum())
    return correct / len(test_x)


def cnn_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, seed: int, epochs: int = 5,
                 batch_size: int = 64, lr: float = 1e-3, device: str = "cpu") -> float:
    """Small CNN (``SmallCNN``) trained with Adam."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(train_x.shape[1], train_x.shape[2], train_x.shape[3], num_classes)
        return _train_and_test(model, train_x, train_y, test_x, test_y, seed=seed, epochs=epochs,
                               batch_size=batch_size, lr=lr, device=device)


def resnet9_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, seed: int,
                     epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, width: int = 64,
                     device: str = "cpu") -> float:
    """ResNet-9 trained with Adam; meant for 32x32 RGB (CIFAR-10), slow on CPUs at full width."""
    if min(train_x.shape[2:]) < 8:
        raise ValueError(f"resnet9 needs images of at least 8x8, got {train_x.shape[2:]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet9(train_x.shape[1], num_classes, width=width)
        return _train_and_test(model, train_x, train_y, test_x, test_y, seed=seed, epochs=epochs,
                               batch_size=batch_size, lr=lr, device=device)


CLASSIFIERS: dict[str, ClassifierFn] = {
    "logreg": logreg_accuracy,
    "mlp": mlp_accuracy,
    "cnn": cnn_accuracy,
    "resnet9": resnet9_accuracy,
}


# --- the boundary -------------------------------------------------------------------------------


def _check_images(images, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{name} must be a uint8 numpy array, got {got}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be N x C x H x W with C in {{1, 3}}, got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got 0")


def _check_labels(labels, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {labels.shape}")
    if labels.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {int(labels.min())}")
    return labels.astype(np.int64)


def downstream_accuracy(train_images: np.ndarray, train_labels, test_images: np.ndarray, test_labels,
                        *, classifiers: Sequence[str] = ("logreg", "mlp", "cnn"),
                        seed: int = 0) -> dict[str, float]:
    """Test accuracy of each named classifier trained on the train split; name -> accuracy."""
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    if not classifiers:
        raise InvalidArgumentError(f"classifiers must name at least one of {sorted(CLASSIFIERS)}, got none")
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if unknown:
        raise InvalidArgumentError(f"unknown classifier(s) {unknown}; known: {sorted(CLASSIFIERS)}")
    _check_images(train_images, "train_images")
    _check_images(test_images, "test_images")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise InvalidArgumentError(f"train and test images differ in C x H x W: "
                         f"{train_images.shape[1:]} vs {test_images.shape[1:]}")
    train_y = _check_labels(train_labels, len(train_images), "train_labels")
    test_y = _check_labels(test_labels, len(test_images), "test_labels")
    if len(np.unique(train_y)) < 2:
        raise InvalidArgumentError(f"train_labels must contain at least 2 classes, got {len(np.unique(train_y))}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    results: dict[str, float] = {}
    for name in classifiers:
        started = time.perf_counter()
        results[name] = CLASSIFIERS[name](train_images, train_y, test_images, test_y,
                                          num_classes=num_classes, seed=seed)
        logger.info("%s: test accuracy %.4f (%.1f s)", name, results[name], time.perf_counter() - started)
    return results
