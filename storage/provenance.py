"""The public provenance of a release, typed, from the release file to the evaluation report.

Two frozen records, each read and written under the on-disk keys the project has always used:

- `ReleaseInfo`: what the public side knows about one release (its id, budget claim, relation,
  label layout, image shape, moments, norm bounds, encoder, signer). Built once from the read
  release (`ReleaseInfo.from_release`); every checkpoint carries it under "release", and run.json
  carries `ReleaseInfo.summary_dict()`.
- `SyntheticInfo`: the provenance of a synthetic dataset: the release's identity and claim (taken
  from a ReleaseInfo, never re-typed) plus how the images were sampled (training steps, checkpoint,
  seed). It is the synthetic file's metadata, and every metric row of that file is built from it.

Reading (`from_dict`) never invents a value: a missing required field raises ProvenanceError naming
the file and the field. The only defaults are documented `None`s for fields older files never had:
  ReleaseInfo.neighbouring, ReleaseInfo.signed_by, ReleaseInfo.release_sha256: None = not recorded
    (checkpoints written before they were), or unsigned (signed_by);
  SyntheticInfo.dataset_id, checkpoint, seed, neighbouring, release_sha256, encoder_weights_sha256:
    None = not recorded (files written by other tools, or before the field was recorded).
  `to_dict` omits a None optional field, so a file round-trips with exactly the keys it was written with.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mepf_core.cells import CELLS_PER_CLASS, row_shares
from mepf_core.encoders import EncoderSpec
from mepf_core.errors import InvalidArgumentError

if TYPE_CHECKING:
    from storage.release import Release


class ProvenanceError(InvalidArgumentError):
    """A provenance record (a checkpoint's "release", a synthetic file's metadata) lacks a field or holds
    a value of the wrong type; the message names the record and the fields."""


def _require(d: Mapping, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(d, Mapping):
        raise ProvenanceError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ProvenanceError(f"{where} lacks {missing} (required: {list(keys)})")


def _number(d: Mapping, key: str, where: str, *, optional: bool = False) -> float | None:
    value = d[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProvenanceError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def _integer(d: Mapping, key: str, where: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ProvenanceError(f"{where}: {key} must be an integer >= 0, got {value!r}")
    return int(value)


def _text(d: Mapping, key: str, where: str, *, optional: bool = False) -> str | None:
    value = d.get(key) if optional else d[key]
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProvenanceError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _names(value, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ProvenanceError(f"{where}: {key} must be a list of strings, got {value!r}")
    return tuple(value)


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 (64 hex digits) of a file's bytes, as `sha256sum` prints it; None when it cannot be read
    (a Release built in memory, or a file removed since it was read: the hash is then not recorded)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class ReleaseInfo:
    """The public provenance of one release (no private number: everything here is in the release file).

    release_id: the release's id; dataset_id: the budget it was charged to; epsilon, delta: its
    recomputed claim (epsilon spent at delta, under `neighbouring`); labelled: per-class embeddings;
    class_names: K names (one "all" entry when unlabelled); image_shape: (C, H, W) of the data;
    moments: 1 or 2; norm_bound, second_moment_bound: the feature bounds; encoder: the feature map's
    spec; path: the release file, resolved; neighbouring: "add-remove" / "replace-one" (None: not
    recorded); signed_by: the signer's key fingerprint "sha256:..." (None: unsigned or not recorded);
    release_sha256: SHA-256 (64 hex) of the release file's bytes, as `sha256sum release.h5` prints it
    (None: not recorded).
    """

    release_id: str
    dataset_id: str
    epsilon: float
    delta: float
    labelled: bool
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    moments: int
    norm_bound: float
    second_moment_bound: float | None
    encoder: EncoderSpec
    path: str
    neighbouring: str | None = None
    signed_by: str | None = None
    release_sha256: str | None = None
    image_mode_source: str | None = None  # how image_shape was chosen (storage.datasets.IMAGE_MODE_SOURCES)
    cells_per_class: int = 1  # M (mepf_core.cells): the generator is conditioned on K x M rows
    row_shares: tuple[float, ...] | None = None  # with M > 1: each row's share of its class (mepf_core.cells.row_shares)

    REQUIRED = ("path", "release_id", "dataset_id", "epsilon", "delta", "labelled", "class_names", "image_shape",
                "moments", "norm_bound", "second_moment_bound", "encoder")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def rows(self) -> int:
        """K x M: the generator's conditioning rows (one per class and cell)."""
        return self.num_classes * self.cells_per_class

    @classmethod
    def from_release(cls, release: "Release") -> "ReleaseInfo":
        """The provenance of a release read (and verified) by storage.release.read_release."""
        m, sig = release.metadata, release.signature
        shares = None
        if m.cells_per_class > 1:  # post-processing of the released noisy counts
            shares = tuple(float(v) for v in row_shares(release.noisy["counts"], m.cells_per_class))
        return cls(release_id=m.release_id, dataset_id=m.dataset_id, epsilon=m.epsilon, delta=m.delta,
                   labelled=m.labelled, class_names=tuple(m.class_names), image_shape=tuple(m.image_shape),
                   moments=m.moments, norm_bound=m.norm_bound, second_moment_bound=m.second_moment_bound,
                   encoder=m.encoder, path=str(Path(release.path).resolve()), neighbouring=m.neighbouring,
                   signed_by=sig.fingerprint if sig is not None and sig.signed else None,
                   release_sha256=file_sha256(release.path), image_mode_source=m.image_mode_source,
                   cells_per_class=m.cells_per_class, row_shares=shares)

    def to_dict(self) -> dict:
        """JSON-ready dict: a checkpoint's "release" entry (num_classes kept for older readers)."""
        d = {"path": self.path, "release_id": self.release_id, "dataset_id": self.dataset_id,
             "epsilon": self.epsilon, "delta": self.delta, "labelled": self.labelled,
             "class_names": list(self.class_names), "num_classes": self.num_classes,
             "image_shape": list(self.image_shape), "moments": self.moments, "norm_bound": self.norm_bound,
             "second_moment_bound": self.second_moment_bound, "encoder": self.encoder.to_dict()}
        for key in ("neighbouring", "signed_by", "release_sha256", "image_mode_source"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.cells_per_class != 1:
            d["cells_per_class"], d["row_shares"] = self.cells_per_class, list(self.row_shares)
        return d

    @classmethod
    def from_dict(cls, d: Mapping, *, where: str = "release provenance") -> "ReleaseInfo":
        """Inverse of `to_dict`; raises ProvenanceError naming `where` for a missing or mistyped field."""
        _require(d, cls.REQUIRED, where)
        if not isinstance(d["labelled"], bool):
            raise ProvenanceError(f"{where}: labelled must be true or false, got {d['labelled']!r}")
        shape = d["image_shape"]
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise ProvenanceError(f"{where}: image_shape must be three integers > 0 (C, H, W), got {shape!r}")
        try:
            encoder = EncoderSpec.from_dict(d["encoder"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProvenanceError(f"{where}: encoder is malformed ({type(exc).__name__}: {exc})") from None
        cells, shares = d.get("cells_per_class", 1), d.get("row_shares")
        if isinstance(cells, bool) or cells not in CELLS_PER_CLASS:
            raise ProvenanceError(f"{where}: cells_per_class must be one of {list(CELLS_PER_CLASS)}, got {cells!r}")
        if cells > 1 and (not isinstance(shares, (list, tuple)) or len(shares) != cells * len(d["class_names"])
                          or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in shares)):
            raise ProvenanceError(f"{where}: row_shares must be {cells} x classes numbers >= 0, got {shares!r}")
        return cls(release_id=_text(d, "release_id", where), dataset_id=_text(d, "dataset_id", where),
                   epsilon=_number(d, "epsilon", where), delta=_number(d, "delta", where), labelled=d["labelled"],
                   class_names=_names(d["class_names"], "class_names", where), image_shape=tuple(shape),
                   moments=_integer(d, "moments", where), norm_bound=_number(d, "norm_bound", where),
                   second_moment_bound=_number(d, "second_moment_bound", where, optional=True), encoder=encoder,
                   path=_text(d, "path", where), neighbouring=_text(d, "neighbouring", where, optional=True),
                   signed_by=_text(d, "signed_by", where, optional=True),
                   release_sha256=_text(d, "release_sha256", where, optional=True),
                   image_mode_source=_text(d, "image_mode_source", where, optional=True),
                   cells_per_class=cells, row_shares=tuple(float(v) for v in shares) if cells > 1 else None)

    def summary_dict(self) -> dict:
        """The "release" entry of run.json: path, release_id, dataset_id, epsilon, delta, class_names."""
        return {"path": self.path, "release_id": self.release_id, "dataset_id": self.dataset_id,
                "epsilon": self.epsilon, "delta": self.delta, "class_names": list(self.class_names)}


@dataclass(frozen=True)
class SyntheticInfo:
    """The provenance of a synthetic dataset: its release's claim and how it was sampled.

    epsilon, delta: the release's claim (None: non-private); release_id; encoder: the encoder's name;
    class_names: the label names, None when unlabelled; steps: generator training steps (>= 0);
    dataset_id, checkpoint (file name), seed, neighbouring, release_sha256 (the release file's SHA-256),
    encoder_weights_sha256 (the encoder weights' SHA-256): None when not recorded (module docstring).
    """

    release_id: str
    epsilon: float | None
    delta: float | None
    encoder: str
    class_names: tuple[str, ...] | None
    steps: int
    dataset_id: str | None = None
    checkpoint: str | None = None
    seed: int | None = None
    neighbouring: str | None = None
    release_sha256: str | None = None
    encoder_weights_sha256: str | None = None
    # "inferred-from-data": the channel count is one bit of the private images outside epsilon (the card says so)
    image_mode_source: str | None = None

    REQUIRED = ("epsilon", "delta", "release_id", "encoder", "class_names", "steps")
    OPTIONAL = ("dataset_id", "checkpoint", "seed", "neighbouring", "release_sha256", "encoder_weights_sha256",
                "image_mode_source")

    @classmethod
    def from_release(cls, info: ReleaseInfo, *, steps: int, checkpoint: str, seed: int) -> "SyntheticInfo":
        """Samples of `steps`-step generator `checkpoint` trained on the release `info`, drawn with `seed`."""
        return cls(release_id=info.release_id, epsilon=info.epsilon, delta=info.delta, encoder=info.encoder.name,
                   class_names=info.class_names if info.labelled else None, steps=int(steps),
                   dataset_id=info.dataset_id, checkpoint=checkpoint, seed=seed, neighbouring=info.neighbouring,
                   release_sha256=info.release_sha256,
                   encoder_weights_sha256=info.encoder.weights_sha256 or None,
                   image_mode_source=info.image_mode_source)

    def to_dict(self) -> dict:
        """The synthetic file's metadata JSON object (None optional fields omitted)."""
        d = {"epsilon": self.epsilon, "delta": self.delta, "release_id": self.release_id, "encoder": self.encoder,
             "class_names": None if self.class_names is None else list(self.class_names), "steps": self.steps}
        d.update({k: getattr(self, k) for k in self.OPTIONAL if getattr(self, k) is not None})
        return d

    @classmethod
    def from_dict(cls, d: Mapping, *, where: str = "synthetic metadata") -> "SyntheticInfo":
        """Inverse of `to_dict`; unknown keys are ignored; raises ProvenanceError for a missing or
        mistyped field (the message lists the required ones)."""
        _require(d, cls.REQUIRED, where)
        names = d["class_names"]
        seed = d.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ProvenanceError(f"{where}: seed must be an integer, got {seed!r}")
        return cls(release_id=_text(d, "release_id", where), epsilon=_number(d, "epsilon", where, optional=True),
                   delta=_number(d, "delta", where, optional=True), encoder=_text(d, "encoder", where),
                   class_names=None if names is None else _names(names, "class_names", where),
                   steps=_integer(d, "steps", where), dataset_id=_text(d, "dataset_id", where, optional=True),
                   checkpoint=_text(d, "checkpoint", where, optional=True),
                   seed=None if seed is None else int(seed),
                   neighbouring=_text(d, "neighbouring", where, optional=True),
                   release_sha256=_text(d, "release_sha256", where, optional=True),
                   encoder_weights_sha256=_text(d, "encoder_weights_sha256", where, optional=True),
                   image_mode_source=_text(d, "image_mode_source", where, optional=True))
