"""Downstream accuracy: train a classifier on (synthetic) images, test it on a real test split.

Each classifier is a function ``(train_x, train_y, test_x, *, num_classes, seed) -> predicted labels``
(int64, shape (len(test_x),)) on validated uint8 N x C x H x W images, registered in ``CLASSIFIERS``;
``downstream_scores`` turns the predictions into the accuracy on the whole test split and per class
(``ClassifierScore``), ``downstream_accuracy`` keeps only the whole-split accuracy. Settings are sized
for CPUs: they measure whether synthetic data carries class information, not the best reachable
accuracy. Everything is seeded; the torch models train in a forked RNG so callers' random state is
untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mepf_core.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

ClassifierFn = Callable[..., np.ndarray]  # (train_x, train_y, test_x, *, num_classes, seed) -> predictions


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


def logreg_predictions(train_x, train_y, test_x, *, num_classes: int, seed: int,
                       max_iter: int = 200) -> np.ndarray:
    """Multinomial logistic regression (L-BFGS) on pixels in [0, 1]; predicted test labels (int64, N)."""
    from sklearn.linear_model import LogisticRegression

    model = _fit_quietly(LogisticRegression(max_iter=max_iter, random_state=seed),
                         _flat(train_x), train_y, "logreg")
    return np.asarray(model.predict(_flat(test_x)), dtype=np.int64)


def mlp_predictions(train_x, train_y, test_x, *, num_classes: int, seed: int,
                    hidden: tuple[int, ...] = (256,), max_iter: int = 100) -> np.ndarray:
    """One-hidden-layer MLP (Adam, early stopping on a 10% split) on pixels in [0, 1]; predicted test
    labels (int64, N)."""
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=hidden, early_stopping=True, max_iter=max_iter,
                          random_state=seed)
    model = _fit_quietly(model, _flat(train_x), train_y, "mlp")
    return np.asarray(model.predict(_flat(test_x)), dtype=np.int64)


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


def _trained_epochs(model: nn.Module, train_x, train_y, *, seed: int, epochs: int, batch_size: int, lr: float,
                    device: str):
    """Adam on cross-entropy, one shuffled pass per epoch (seeded); yields the model, in eval mode,
    after each epoch. ValueError for epochs <= 0."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    model = model.to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = _to_tensor(train_x), torch.from_numpy(train_y.astype(np.int64))
    shuffler = torch.Generator().manual_seed(seed)
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=shuffler)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and has_batch_norm:
                continue  # batch norm cannot train on a single example
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        model.eval()
        yield model


def _predict(model: nn.Module, images, device: str) -> np.ndarray:
    """Predicted labels (int64, N) of uint8 images, in batches of 512."""
    with torch.inference_mode():
        return np.concatenate([model(_to_tensor(images[i : i + 512]).to(device)).argmax(1).cpu().numpy()
                               for i in range(0, len(images), 512)]).astype(np.int64)


def _train_and_predict(model: nn.Module, train_x, train_y, test_x, *, seed: int, epochs: int,
                       batch_size: int, lr: float, device: str) -> np.ndarray:
    """Adam on cross-entropy for a fixed number of epochs, then the predicted test labels (int64, N)."""
    for trained in _trained_epochs(model, train_x, train_y, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                   device=device):
        pass
    return _predict(trained, test_x, device)


def cnn_predictions(train_x, train_y, test_x, *, num_classes: int, seed: int, epochs: int = 5,
                    batch_size: int = 64, lr: float = 1e-3, device: str = "cpu") -> np.ndarray:
    """Small CNN (``SmallCNN``) trained with Adam; predicted test labels (int64, N)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(train_x.shape[1], train_x.shape[2], train_x.shape[3], num_classes)
        return _train_and_predict(model, train_x, train_y, test_x, seed=seed, epochs=epochs,
                                  batch_size=batch_size, lr=lr, device=device)


def resnet9_predictions(train_x, train_y, test_x, *, num_classes: int, seed: int,
                        epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, width: int = 64,
                        device: str = "cpu") -> np.ndarray:
    """ResNet-9 trained with Adam; meant for 32x32 RGB (CIFAR-10), slow on CPUs at full width.
    Predicted test labels (int64, N); ValueError for images smaller than 8x8."""
    if min(train_x.shape[2:]) < 8:
        raise ValueError(f"resnet9 needs images of at least 8x8, got {train_x.shape[2:]}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNet9(train_x.shape[1], num_classes, width=width)
        return _train_and_predict(model, train_x, train_y, test_x, seed=seed, epochs=epochs,
                                  batch_size=batch_size, lr=lr, device=device)


class _BasicBlock(nn.Module):
    """conv3-BN-ReLU-conv3-BN plus the input (a 1x1 strided projection when the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) sized for CPUs.

    A 3x3 stem to `width` channels, three stages of `blocks` basic blocks at width, 2 x width
    (stride 2) and 4 x width (stride 2), global average pooling, one linear layer. blocks=1 is a
    ResNet-8, blocks=3 the ResNet-20. Input N x C x H x W (H, W >= 4), output N x num_classes logits.
    """

    def __init__(self, channels: int, num_classes: int, width: int = 16, blocks: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
        for stage in range(3):
            c_out = width * 2**stage
            for b in range(blocks):
                layers.append(_BasicBlock(c_in, c_out, stride=2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# The fixed schedule of the `resnet` classifier, after DPImageBench's protocol (a ResNet-style network
# trained on the synthetic images, the best of a small fixed schedule chosen on validation data):
# Adam at each learning rate for RESNET_EPOCHS epochs; the (learning rate, epoch) with the best
# accuracy on the selection data is kept (`resnet_select`). `resnet` alone (no selection data, e.g.
# `mepf evaluate --classifiers resnet`) trains the schedule's end point at its first learning rate,
# untuned. The full schedule on 60,000 images took 13 min at one thread on an idle AVX-512 host (README,
# quality table, with its command): `bench/bench_quality.py --resnet` runs it, nothing runs it by default.
RESNET_LRS = (1e-3, 3e-3)
RESNET_EPOCHS = 6
RESNET_LR = RESNET_LRS[0]


def _epoch_predictions(model: nn.Module, train_x, train_y, eval_x, *, seed: int, epochs: int, batch_size: int,
                       lr: float, device: str):
    """Adam on cross-entropy; after each epoch, yields the predicted labels of eval_x (int64, N)."""
    for trained in _trained_epochs(model, train_x, train_y, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                                   device=device):
        yield _predict(trained, eval_x, device)


def _check_resnet_input(train_x) -> None:
    if min(train_x.shape[2:]) < 4:
        raise ValueError(f"resnet needs images of at least 4x4, got {train_x.shape[2:]}")


def resnet_predictions(train_x, train_y, test_x, *, num_classes: int, seed: int, epochs: int = RESNET_EPOCHS,
                       lr: float = RESNET_LR, batch_size: int = 128, width: int = 16, blocks: int = 1,
                       device: str = "cpu") -> np.ndarray:
    """`SmallResNet` trained with Adam for `epochs` epochs at `lr`; predicted test labels (int64, N).
    ValueError for images smaller than 4x4 or epochs <= 0."""
    _check_resnet_input(train_x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallResNet(train_x.shape[1], num_classes, width=width, blocks=blocks)
        for predicted in _epoch_predictions(model, train_x, train_y, test_x, seed=seed, epochs=epochs,
                                            batch_size=batch_size, lr=lr, device=device):
            pass
        return predicted


@dataclasses.dataclass(frozen=True)
class ResNetSelection:
    """What `resnet_select` chose: `predictions` on the test images (int64, N) of the (lr, epoch) with
    the best selection accuracy, and `select_accuracy[(lr, epoch)]` for every point of the schedule."""

    predictions: np.ndarray
    lr: float
    epoch: int
    select_accuracy: dict[tuple[float, int], float]


def resnet_select(train_x, train_y, select_x, select_y, test_x, *, num_classes: int, seed: int,
                  lrs: Sequence[float] = RESNET_LRS, epochs: int = RESNET_EPOCHS, batch_size: int = 128,
                  width: int = 16, blocks: int = 1, device: str = "cpu") -> ResNetSelection:
    """The best of a fixed schedule: one `SmallResNet` per learning rate in `lrs`, each scored on the
    selection images after every epoch; the test predictions of the (lr, epoch) with the highest
    selection accuracy (ties: the earlier) are returned. The test images never influence the choice.
    Images uint8 N x C x H x W; labels int (N,). ValueError as `resnet_predictions`."""
    _check_resnet_input(train_x)
    select_y = np.asarray(select_y)
    eval_x = np.concatenate([select_x, test_x])
    cut = len(select_x)
    scores: dict[tuple[float, int], float] = {}
    best: tuple[float, float, int, np.ndarray] | None = None
    for lr in lrs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SmallResNet(train_x.shape[1], num_classes, width=width, blocks=blocks)
            for epoch, predicted in enumerate(_epoch_predictions(model, train_x, train_y, eval_x, seed=seed,
                                                                 epochs=epochs, batch_size=batch_size, lr=lr,
                                                                 device=device), start=1):
                accuracy = float((predicted[:cut] == select_y).mean())
                scores[(float(lr), epoch)] = accuracy
                if best is None or accuracy > best[0]:
                    best = (accuracy, float(lr), epoch, predicted[cut:])
    return ResNetSelection(best[3], best[1], best[2], scores)


def _accuracy_of(predict: ClassifierFn) -> Callable[..., float]:
    def accuracy(train_x, train_y, test_x, test_y, **kwargs) -> float:
        return float((predict(train_x, train_y, test_x, **kwargs) == np.asarray(test_y)).mean())

    accuracy.__name__ = predict.__name__.replace("_predictions", "_accuracy")
    accuracy.__doc__ = (f"Test accuracy (a float in [0, 1]) of `{predict.__name__}` trained on (train_x, train_y); "
                        "same keyword arguments.")
    return accuracy


logreg_accuracy = _accuracy_of(logreg_predictions)
mlp_accuracy = _accuracy_of(mlp_predictions)
cnn_accuracy = _accuracy_of(cnn_predictions)
resnet9_accuracy = _accuracy_of(resnet9_predictions)
resnet_accuracy = _accuracy_of(resnet_predictions)

CLASSIFIERS: dict[str, ClassifierFn] = {
    "logreg": logreg_predictions,
    "mlp": mlp_predictions,
    "cnn": cnn_predictions,
    "resnet9": resnet9_predictions,
    "resnet": resnet_predictions,
}


@dataclasses.dataclass(frozen=True)
class ClassifierScore:
    """One classifier's result on the test split.

    `accuracy`: share of all test images predicted right (float in [0, 1]). `per_class[k]`: share of
    the test images of label k predicted right (the recall of class k), NaN for a label with no test
    image; length num_classes (one more than the largest label in train or test).
    """

    accuracy: float
    per_class: tuple[float, ...]

    @classmethod
    def of_predictions(cls, predicted: np.ndarray, test_y: np.ndarray, num_classes: int) -> "ClassifierScore":
        """Score predicted labels (int, shape (N,)) against true labels (int, shape (N,))."""
        predicted, test_y = np.asarray(predicted), np.asarray(test_y)
        if predicted.shape != test_y.shape:
            raise ValueError(f"predictions must have shape {test_y.shape} like the test labels, got {predicted.shape}")
        right = predicted == test_y
        per_class = tuple(float(right[test_y == k].mean()) if (test_y == k).any() else math.nan
                          for k in range(num_classes))
        return cls(float(right.mean()), per_class)


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


def downstream_scores(train_images: np.ndarray, train_labels, test_images: np.ndarray, test_labels,
                      *, classifiers: Sequence[str] = ("logreg", "mlp", "cnn"),
                      seed: int = 0) -> dict[str, ClassifierScore]:
    """Accuracy on the whole test split and per class of each named classifier trained on the train
    split; name -> ClassifierScore.

    Images: uint8 N x C x H x W (C 1 or 3), the same C x H x W on both sides; labels: non-negative
    integers, shape (N,), at least 2 classes in training. Raises InvalidArgumentError (a ValueError)
    for anything else and for an unknown classifier name.
    """
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

    results: dict[str, ClassifierScore] = {}
    for name in classifiers:
        started = time.perf_counter()
        predicted = CLASSIFIERS[name](train_images, train_y, test_images, num_classes=num_classes, seed=seed)
        results[name] = ClassifierScore.of_predictions(predicted, test_y, num_classes)
        logger.info("%s: test accuracy %.4f (%.1f s)", name, results[name].accuracy, time.perf_counter() - started)
    return results


def downstream_accuracy(train_images: np.ndarray, train_labels, test_images: np.ndarray, test_labels,
                        *, classifiers: Sequence[str] = ("logreg", "mlp", "cnn"),
                        seed: int = 0) -> dict[str, float]:
    """Test accuracy of each named classifier trained on the train split; name -> accuracy (float in
    [0, 1]). `downstream_scores` with the per-class accuracies dropped; same arguments and errors."""
    scores = downstream_scores(train_images, train_labels, test_images, test_labels, classifiers=classifiers,
                               seed=seed)
    return {name: score.accuracy for name, score in scores.items()}
