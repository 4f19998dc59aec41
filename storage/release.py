"""The release file: the noisy embedding and everything the public side needs, in HDF5.

Layout (schema version 2; version 1 files, whose noise was floating-point, are refused on reading):

    /moment1   float64 K x D   noisy per-class sums of phi_1
    /moment2   float64 K x D   noisy per-class sums of phi_2 (only when moments = 2)
    /counts    float64 K       noisy per-class counts (exact only when public under the relation)
    Every value is an integer times its part's lattice_unit (`mepf_core.privacy.lattice`): integer sums
    plus exact discrete Gaussian noise, so no floating-point noise bit is ever written.
    attrs: schema_version (int), metadata_json (str), metadata_sha256 (str)
    optional attrs (a signed release, all four or none): signature (hex, 64 bytes),
        signer_public_key (hex, 32 bytes), signer_fingerprint (str), signer_name (str)

`metadata_json` records each dataset's SHA-256, so any byte change is caught on reading.
Only the fields listed in `ReleaseMetadata` are written: nothing un-noised about the private
data except what the neighbouring relation makes public. Datasets are contiguous, unfiltered and
stored in the file itself; the writer never compresses, chunks, links or stores externally.

What `read_release` proves before it returns, in this order (the first failure raises):
1. the file's structure: only the expected attributes, hard links to plain datasets (no soft or
   external links, groups, virtual or external-storage datasets, filters or chunking);
2. the metadata's integrity (SHA-256) and schema: parts match `moments`; K = number of classes
   (1 when unlabelled); one feature dimension D >= 1 for every moment (the public stage rebuilds the
   encoder and refuses a spec that differs, `mepf_core.public_map.check_encoder`);
3. the privacy claim (`verify_claim`): every sensitivity follows from the relation and the
   recorded bounds, sigma = noise_multiplier x sensitivity per part, and epsilon recomputed with
   the custodian's own calibration code equals the recorded epsilon and is at most target_epsilon;
4. the signature, if any (`storage.signing`), and that the signer is trusted when keys are given;
5. each dataset's dtype, shape and stored size against the metadata, before its data is read: a
   contiguous, unfiltered dataset stores exactly its raw bytes in the file, so nothing read can be
   larger than the file itself (no decompression bombs, whatever shape the metadata claims);
6. the arrays: SHA-256, finite values, every value on its part's lattice (integer x lattice_unit),
   exact counts equal to the recorded public n, and sums no larger than the recorded norm bounds allow
   (`check_sums_within_bounds`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from mepf_core import __version__
from mepf_core.cells import CELLS_PER_CLASS, tabulated_centroids, tabulated_offsets
from mepf_core.embedding import mean_embeddings
from mepf_core.encoders import EncoderSpec
from mepf_core.errors import DiskFullError, InvalidArgumentError, MepfError, PathNotFoundError, file_access_error
from mepf_core.privacy.calibration import MAX_TARGET_DELTA, epsilon_spent, validate_delta
from mepf_core.privacy.lattice import lattice_unit
from mepf_core.privacy.sensitivity import count_sensitivity, parse_neighbouring, sum_sensitivity
from storage import signing
from storage.atomic import TargetExistsError, atomic_path

SCHEMA_VERSION = 2  # 2: lattice releases (discrete Gaussian noise, zCDP accounting); 1 had float noise
PART_NAMES = ("moment1", "moment2", "counts")
REQUIRED_ATTRS = ("schema_version", "metadata_json", "metadata_sha256")
SIGNATURE_ATTRS = ("signature", "signer_public_key", "signer_fingerprint", "signer_name")

# Tolerances of the claim check. Sensitivities and sigmas are recomputed by the same float64
# formulas the custodian used and survive JSON exactly, so these only absorb harmless rounding.
SENSITIVITY_RTOL = 1e-12
SIGMA_RTOL = 1e-9
EPSILON_RTOL = 1e-9



class ReleaseError(MepfError):
    """Base class: the file is not a valid dp-mepf release."""


class ReleaseCorruptError(ReleaseError):
    """Unreadable, truncated, or a checksum does not match."""


class ReleaseSchemaError(ReleaseError):
    """Readable, but a field is missing, of the wrong type, shape or version."""


class ReleaseStorageError(ReleaseSchemaError):
    """The HDF5 structure is foreign: a link, group, virtual or external dataset, a filter
    (compression), chunking, or a stored size that disagrees with the shape. Raised before any
    array is read."""


class ReleaseClaimError(ReleaseError):
    """The privacy claim does not follow from the recorded noise: a sensitivity that the relation
    and norm bounds do not give, sigma != noise_multiplier x sensitivity, an exact part the relation
    does not make public, or a recorded epsilon that the calibration code does not reproduce."""


class ReleaseSignatureError(ReleaseError):
    """A signature is present but malformed or does not verify: the file was changed after signing."""


class ReleaseUntrustedError(ReleaseError):
    """Trusted keys were required, and the release is unsigned or signed by another key."""


class ReleaseExistsError(TargetExistsError):
    """The release path was taken (before or during the write); releases are never overwritten."""


@dataclass(frozen=True)
class PartRecord:
    """What a release file records about one released array (the `GaussianPart` it came from).

    name: "moment1" | "moment2" | "counts"; shape: the array's shape (K x D for the sums, (K,) for the
    counts); sensitivity: its L2 sensitivity under the release's relation (0: released exactly);
    sigma: the noise standard deviation added to every entry (units of the part, 0 when exact);
    noise_multiplier: z = sigma / sensitivity, None when released exactly; lattice_unit: feature units
    per integer step (norm bound / 2^20 for the sums, 1 for the counts): every released value is an
    integer times it; sha256: hex digest of the array's float64 bytes as written (checked on reading:
    ReleaseCorruptError).
    """

    name: str
    shape: tuple[int, ...]
    sensitivity: float
    sigma: float
    noise_multiplier: float | None  # None when released exactly (sensitivity 0)
    lattice_unit: float
    sha256: str = ""

    @classmethod
    def of(cls, part, shape: tuple[int, ...]) -> "PartRecord":
        """The record of a `mepf_core.privacy.mechanism.GaussianPart` released with `shape` (no checksum yet)."""
        return cls(part.name, tuple(shape), part.sensitivity, part.sigma,
                   part.noise_multiplier if part.noised else None, part.lattice_unit)


@dataclass(frozen=True)
class ReleaseMetadata:
    """The public description of a release, stored as checksummed JSON in the file (schema SCHEMA_VERSION).

    Everything the public stage may know: the privacy claim (epsilon actually spent, at delta, under
    `neighbouring`, with target_epsilon and the norm bounds C1 = norm_bound, C2 = second_moment_bound
    (None with moments 1)), the format (moments 1 or 2, labelled, class_names of K classes,
    image_shape C, H, W), the encoder (`EncoderSpec`, with its weights' SHA-256), one `PartRecord` per
    array, and identity (release_id: uuid4 hex; created_at: ISO 8601 UTC; code_version). dataset_id is
    the ledger key charged; n_public the dataset size, present only when the relation makes n public
    (replace-one, unlabelled: the counts are then exact); image_mode_source how the image shape was chosen
    (None: not recorded). `read_release` re-derives the claim from these fields (ReleaseClaimError).
    """

    dataset_id: str
    neighbouring: str
    epsilon: float  # epsilon actually spent (<= target) at delta
    delta: float
    target_epsilon: float
    norm_bound: float
    second_moment_bound: float | None
    moments: int
    labelled: bool
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # C, H, W of the dataset's images (public format)
    encoder: EncoderSpec
    parts: tuple[PartRecord, ...]
    n_public: int | None = None  # only when the relation makes n public (replace-one)
    # how image_shape was chosen: "flag" | "dataset-default" | "inferred-from-data" (an image folder
    # without --channels: 1 channel iff every image is grayscale, a data-dependent bit the custodian
    # declares public); None in releases written before it was recorded. storage.datasets.IMAGE_MODE_SOURCES
    image_mode_source: str | None = None
    # within-class cells (mepf_core.cells): M rows per class and the public split that placed them. Voronoi
    # cells: the SHA-256 of that split's tabulated centroids and the seed of their projection. Hyperplane
    # cells: the seed of the normals and their B = log2 M offsets (reference None: offsets 0). M = 1: no
    # cells, the others None (releases written before cells were recorded read as M = 1; before Voronoi
    # cells, as hyperplane cells).
    cells_per_class: int = 1
    cell_seed: int | None = None
    cell_offsets: tuple[float, ...] | None = None
    cell_reference: str | None = None
    cell_centroids_sha256: str | None = None
    release_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    code_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        """K: the number of classes (1 for an unlabelled release)."""
        return len(self.class_names)

    @property
    def rows(self) -> int:
        """K x M: the released rows, one per (class, cell)."""
        return self.num_classes * self.cells_per_class

    def to_json(self) -> str:
        """The metadata as canonical JSON (sorted keys), as stored and hashed in the file."""
        d = asdict(self)
        d["encoder"] = self.encoder.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ReleaseMetadata":
        """Parse `to_json`'s text; ReleaseSchemaError when a field is missing or malformed."""
        try:
            d = json.loads(text)
            d["encoder"] = EncoderSpec.from_dict(d["encoder"])
            d["parts"] = tuple(PartRecord(**{**p, "shape": tuple(p["shape"])}) for p in d["parts"])
            d["class_names"] = tuple(d["class_names"])
            d["image_shape"] = tuple(d["image_shape"])
            if d.get("cell_offsets") is not None:
                d["cell_offsets"] = tuple(d["cell_offsets"])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseSchemaError(f"release metadata is malformed: {type(exc).__name__}: {exc}") from None

    def part(self, name: str) -> PartRecord:
        """The record of part `name` ("moment1", "moment2", "counts"); KeyError when absent."""
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class SignatureInfo:
    """Who signed a release. Only valid signatures get here: an invalid one raises on reading.

    signed: the file carries a signature (it verified against the embedded public key);
    fingerprint: "sha256:<64 hex>" of the signer's public key (None when unsigned);
    signer: the name the signer put in (signed along with the metadata; '' when none);
    trusted: True/False when the reader was given trusted keys, None when it was not.
    """

    signed: bool
    fingerprint: str | None = None
    signer: str | None = None
    trusted: bool | None = None

    def as_dict(self) -> dict:
        """JSON-ready dict (the `signature` object of `mepf inspect --json`)."""
        return {"signed": self.signed, "valid": self.signed, "fingerprint": self.fingerprint,
                "signer": self.signer, "trusted": self.trusted}


UNSIGNED = SignatureInfo(signed=False)


@dataclass(frozen=True)
class Release:
    """A release file as read and verified by `read_release` (structure, checksums, claim, signature).

    path: the file; metadata: its `ReleaseMetadata`; noisy: the released float64 arrays by part name
    (K x D sums, (K,) counts); signature: who signed it (UNSIGNED when nobody did);
    epsilon_recomputed: epsilon at metadata.delta recomputed from the recorded noise multipliers.
    """

    path: Path
    metadata: ReleaseMetadata
    noisy: dict[str, np.ndarray]  # the released arrays, by part name
    signature: SignatureInfo = UNSIGNED
    epsilon_recomputed: float | None = None  # epsilon at delta recomputed from the noise (verify_claim)

    def mean_embeddings(self) -> dict[str, np.ndarray]:
        """Per-class mean embeddings (post-processing): {"moment1": K x D, ["moment2": K x D]}."""
        return mean_embeddings(self.noisy)


def on_lattice(values: np.ndarray, unit: float) -> bool:
    """True when every value is float64(k) x unit for an integer k, bit for bit (as `sums_to_noisy_parts`
    writes them): what a release made on the integer lattice holds, and float noise almost never does."""
    steps = np.round(np.asarray(values, dtype=np.float64) / unit)
    return bool(np.array_equal(steps * unit, values))


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).tobytes()).hexdigest()


# --- metadata checks (no array data needed) --------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(value, what: str, error: type[ReleaseError] = ReleaseClaimError) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def _check_shapes(meta: ReleaseMetadata) -> None:
    """Parts, K and D consistent with moments, classes and the encoder (ReleaseSchemaError)."""
    if meta.moments not in (1, 2) or isinstance(meta.moments, bool):
        raise ReleaseSchemaError(f"moments must be 1 or 2, got {meta.moments!r}")
    if not isinstance(meta.labelled, bool):
        raise ReleaseSchemaError(f"labelled must be true or false, got {meta.labelled!r}")
    names = [p.name for p in meta.parts]
    expected = ["moment1", "counts"] + (["moment2"] if meta.moments == 2 else [])
    if sorted(names) != sorted(expected):
        raise ReleaseSchemaError(f"parts {sorted(names)} do not match moments={meta.moments} "
                                 f"(expected {sorted(expected)})")
    k = meta.num_classes
    if k < 1 or not all(isinstance(c, str) for c in meta.class_names):
        raise ReleaseSchemaError(f"class_names must be a non-empty list of names, got {k} entries")
    if not meta.labelled and k != 1:
        raise ReleaseSchemaError(f"an unlabelled release has 1 class, metadata names {k}")
    from storage.datasets import IMAGE_MODE_SOURCES

    shape = meta.image_shape
    if len(shape) != 3 or not all(_is_int(v) and v > 0 for v in shape):
        raise ReleaseSchemaError(f"image_shape must be three integers > 0 (C, H, W), got {list(shape)}")
    if meta.image_mode_source is not None and meta.image_mode_source not in IMAGE_MODE_SOURCES:
        raise ReleaseSchemaError(f"image_mode_source must be one of {', '.join(IMAGE_MODE_SOURCES)} or absent, "
                                 f"got {meta.image_mode_source!r}")
    _check_cells(meta)
    rows, per = meta.rows, f"{k} classes" + (f" x {meta.cells_per_class} cells" if meta.cells_per_class > 1 else "")
    dims = set()
    for p in meta.parts:
        if not all(_is_int(s) for s in p.shape):
            raise ReleaseSchemaError(f"part {p.name!r} has a non-integer shape {list(p.shape)}")
        if p.name == "counts":
            if tuple(p.shape) != (rows,):
                raise ReleaseSchemaError(f"counts have shape {list(p.shape)}, expected [{rows}] for {per}")
            continue
        if len(p.shape) != 2 or p.shape[0] != rows:
            raise ReleaseSchemaError(f"part {p.name!r} has shape {list(p.shape)}, expected [{rows}, D] for {per}")
        dims.add(p.shape[1])
    if len(dims) != 1:
        raise ReleaseSchemaError(f"the moment parts have different feature dimensions {sorted(dims)}")
    if min(dims) < 1:
        raise ReleaseSchemaError(f"the feature dimension must be >= 1, got {min(dims)}")


def _check_cells(meta: ReleaseMetadata) -> None:
    """The cells' record is complete and consistent (ReleaseSchemaError): M in CELLS_PER_CLASS; with M = 1
    nothing else; with M > 1 a labelled release and a seed in [0, 2^63), then either Voronoi cells (a
    reference and exactly the SHA-256 of the centroids tabulated for it, the encoder weights, image shape,
    norm bound, seed and M, for as many classes as the release has; no offsets) or hyperplane cells (log2 M
    finite offsets: all 0 without a reference, else exactly the tabulated ones): no free number."""
    m = meta.cells_per_class
    if not _is_int(m) or m not in CELLS_PER_CLASS:
        raise ReleaseSchemaError(f"cells_per_class must be one of {list(CELLS_PER_CLASS)}, got {m!r}")
    cells = (meta.cell_seed, meta.cell_offsets, meta.cell_reference, meta.cell_centroids_sha256)
    if m == 1:
        if any(v is not None for v in cells):
            raise ReleaseSchemaError("a release with one cell per class records no cell_seed, cell_offsets, "
                                     f"cell_reference or cell_centroids_sha256, got {list(cells)}")
        return
    if not meta.labelled:
        raise ReleaseSchemaError(f"cells_per_class {m} needs a labelled release")
    if not _is_int(meta.cell_seed) or not 0 <= meta.cell_seed < 2**63:
        raise ReleaseSchemaError(f"cell_seed must be an integer in [0, 2^63), got {meta.cell_seed!r}")
    bits, offsets, ref = int(math.log2(m)), meta.cell_offsets, meta.cell_reference
    tabulated_at = (ref, meta.encoder.name, meta.encoder.weights_sha256, meta.image_shape, meta.norm_bound,
                    meta.cell_seed, m)
    where = (f"cell_reference {ref!r}, encoder {meta.encoder.name}, image shape {list(meta.image_shape)}, "
             f"norm_bound {meta.norm_bound!r}, cell_seed {meta.cell_seed} and {m} cells")
    known = isinstance(ref, str) and isinstance(meta.norm_bound, (int, float))
    if meta.cell_centroids_sha256 is not None:
        table = tabulated_centroids(*tabulated_at) if known else None
        if offsets is not None or table is None or table[1] != meta.cell_centroids_sha256 \
                or table[0].shape[0] != meta.num_classes:
            raise ReleaseSchemaError(f"cell_centroids_sha256 {meta.cell_centroids_sha256!r} (cell_offsets {offsets!r}) "
                                     f"is not the table of centroids for {where} and {meta.num_classes} classes "
                                     "(mepf_core.cells.PUBLIC_CENTROIDS; Voronoi cells record no offsets)")
        return
    if not isinstance(offsets, (list, tuple)) or len(offsets) != bits or not all(
            isinstance(b, float) and math.isfinite(b) for b in offsets):
        raise ReleaseSchemaError(f"cell_offsets must be {bits} finite numbers for {m} cells, got {offsets!r}")
    if ref is None:
        if any(b != 0.0 or math.copysign(1.0, b) < 0 for b in offsets):  # +0.0 only: not even a free sign bit
            raise ReleaseSchemaError(f"cell_offsets {list(offsets)} without a cell_reference: offsets are 0 unless "
                                     "tabulated for a public split")
        return
    tabulated = tabulated_offsets(*tabulated_at) if known else None
    if tabulated is None or tuple(offsets) != tabulated:
        raise ReleaseSchemaError(f"cell_offsets {list(offsets)} are not the offsets tabulated for {where} "
                                 "(mepf_core.cells.PUBLIC_OFFSETS)")


def verify_claim(meta: ReleaseMetadata) -> float:
    """Recompute the release's epsilon from its recorded noise; return it, or raise ReleaseClaimError.

    Uses the custodian's own code: `sum_sensitivity` / `count_sensitivity`
    (mepf_core.privacy.sensitivity) for each part's sensitivity from the relation, norm bounds and
    labelled flag, and `epsilon_spent` (mepf_core.privacy.calibration, autodp) for the epsilon at
    `delta` of the composed Gaussian mechanisms. Checks, per part: recorded sensitivity = derived one
    (relative 1e-12); sigma = noise_multiplier x sensitivity (relative 1e-9); a part released exactly
    (sensitivity 0, noise_multiplier None, sigma 0) only where the relation makes it public
    (replace-one, unlabelled counts), and then n_public is recorded, otherwise n_public is None.
    Then recomputed epsilon = recorded epsilon (relative 1e-9) and <= target_epsilon (1 + 1e-9).
    """
    try:
        relation = parse_neighbouring(meta.neighbouring)
    except ValueError as exc:
        raise ReleaseClaimError(str(exc)) from None
    delta = _number(meta.delta, "delta")
    try:  # the writer's own limits: a release at delta 0.5 is refused however it was made
        validate_delta(delta, name="delta", cap=MAX_TARGET_DELTA)
    except ValueError as exc:
        raise ReleaseClaimError(str(exc)) from None
    claimed = _number(meta.epsilon, "epsilon")
    target = _number(meta.target_epsilon, "target_epsilon")
    if target <= 0:
        raise ReleaseClaimError(f"target_epsilon must be > 0, got {target!r}")
    bounds = {"moment1": ("norm_bound", meta.norm_bound)}
    if meta.moments == 2:
        bounds["moment2"] = ("second_moment_bound", meta.second_moment_bound)
    elif meta.second_moment_bound is not None:
        raise ReleaseClaimError(f"a 1-moment release records second_moment_bound {meta.second_moment_bound!r}")
    derived = {}
    for name, (what, bound) in bounds.items():
        bound = _number(bound, what)
        if bound <= 0:
            raise ReleaseClaimError(f"{what} must be > 0, got {bound!r}")
        try:
            unit = lattice_unit(bound)
        except ValueError as exc:
            raise ReleaseClaimError(str(exc)) from None
        derived[name] = (sum_sensitivity(relation, bound), f"{relation.value} with {what} {bound!r}", unit)
    labelled = f"{'labelled' if meta.labelled else 'unlabelled'} counts under {relation.value}"
    if meta.cells_per_class != 1:
        labelled += f" with {meta.cells_per_class} cells per class"
    derived["counts"] = (count_sensitivity(relation, labelled=meta.labelled, cells_per_class=meta.cells_per_class),
                         labelled, 1.0)

    multipliers, exact = [], []
    for p in meta.parts:
        want, why, unit = derived[p.name]
        sens = _number(p.sensitivity, f"sensitivity of {p.name!r}")
        if not (sens == want or (want > 0 and _close(sens, want, SENSITIVITY_RTOL))):
            raise ReleaseClaimError(f"part {p.name!r} records sensitivity {sens!r}, but {why} gives {want!r}")
        if _number(p.lattice_unit, f"lattice_unit of {p.name!r}") != unit:
            raise ReleaseClaimError(f"part {p.name!r} records lattice_unit {p.lattice_unit!r}, but its bound gives {unit!r}")
        sigma = _number(p.sigma, f"sigma of {p.name!r}")
        if want == 0:
            if p.noise_multiplier is not None or sigma != 0:
                raise ReleaseClaimError(f"part {p.name!r} is exact ({why}: sensitivity 0) but records "
                                        f"sigma {sigma!r} and noise_multiplier {p.noise_multiplier!r}")
            exact.append(p.name)
            continue
        if p.noise_multiplier is None:
            raise ReleaseClaimError(f"part {p.name!r} has sensitivity {want!r} under {relation.value} "
                                    "but records no noise (released exactly)")
        z = _number(p.noise_multiplier, f"noise_multiplier of {p.name!r}")
        if z <= 0:
            raise ReleaseClaimError(f"noise_multiplier of {p.name!r} must be > 0, got {z!r}")
        if not _close(sigma, z * want, SIGMA_RTOL):
            raise ReleaseClaimError(f"part {p.name!r}: sigma {sigma!r} != noise_multiplier {z!r} x sensitivity "
                                    f"{want!r} = {z * want!r}")
        multipliers.append(z)
    if exact:
        if not _is_int(meta.n_public) or meta.n_public < 0:
            raise ReleaseClaimError(f"parts {exact} are exact (public under {relation.value}) but n_public is "
                                    f"{meta.n_public!r}, not a count")
    elif meta.n_public is not None:
        raise ReleaseClaimError(f"n_public {meta.n_public!r} is recorded, but the counts are noised ({labelled}): "
                                "n is private")
    try:
        recomputed = epsilon_spent(multipliers, delta=delta)
    except Exception as exc:  # autodp's numerics: z far too small or large cannot be a real release
        raise ReleaseClaimError(f"epsilon cannot be recomputed from noise multipliers {multipliers} at delta "
                                f"{delta!r} ({type(exc).__name__})") from None
    if not math.isfinite(recomputed) or not _close(recomputed, claimed, EPSILON_RTOL):
        raise ReleaseClaimError(f"the release claims epsilon {claimed!r}, but its noise multipliers {multipliers} "
                                f"give epsilon {recomputed!r} at delta {delta!r}")
    if recomputed > target * (1 + EPSILON_RTOL):
        raise ReleaseClaimError(f"epsilon {recomputed!r} exceeds the release's target_epsilon {target!r}")
    return recomputed


def _version_message(version) -> str:
    if str(version) == "1":
        return ("schema version 1 is no longer read: its noise was drawn in floating point, whose low-order bits "
                "can leak the sums (mepf_core.privacy.lattice); make a new release with this version of mepf "
                f"(schema {SCHEMA_VERSION}, discrete Gaussian noise on an integer lattice)")
    return f"schema version {version} is not supported (expected {SCHEMA_VERSION})"


def check_metadata(meta: ReleaseMetadata) -> float:
    """All metadata-only checks (schema, shapes, claim); returns the recomputed epsilon."""
    if _number(meta.schema_version, "schema_version", ReleaseSchemaError) != SCHEMA_VERSION:
        raise ReleaseSchemaError(_version_message(meta.schema_version))
    _check_shapes(meta)
    return verify_claim(meta)


# --- writing -------------------------------------------------------------------------------------

# What an HDF5 release adds to its arrays' bytes (superblock, object headers, metadata attributes):
# a few KiB measured; 1 MiB of headroom covers any metadata and the folder's own growth.
RELEASE_OVERHEAD_BYTES = 1 << 20


def check_room_for_release(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise DiskFullError when the folder of `path` lacks room for a release of these part shapes.

    shapes: {part name: shape} (K x D moments, K counts; float64, 8 bytes a value: public sizes).
    Called before the ledger charge, so a disk that is already full costs no budget. Space taken by
    others between this check and the write still fails the write itself (DiskFullError, nothing
    written, the charge kept).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    need = sum(8 * math.prod(shape) for shape in shapes.values()) + RELEASE_OVERHEAD_BYTES
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise DiskFullError(
            f"release {path} needs about {need / 2**20:.1f} MiB but its folder {folder} has {free / 2**20:.1f} MiB "
            f"free: no space left on the device [ENOSPC]; free space there (`df -h {folder}`) or choose another "
            "--out, then run again (nothing was written or charged)")

def embedding_to_release(path: str | os.PathLike, metadata: ReleaseMetadata, noisy: dict[str, np.ndarray], *,
                         signing_key=None, signer_name: str | None = None) -> Path:
    """Write the release atomically and exclusively; checksums of every array go into the metadata.

    noisy: {part name: float64 array of the part's shape (K x D, or K for counts)}.
    signing_key: an Ed25519PrivateKey (`storage.signing.load_private_key`) to sign the release with,
    or None for an unsigned release; signer_name: a printable name signed along with it.
    Raises ValueError for arrays that do not match the metadata or are not finite, ReleaseError
    subclasses for metadata whose claim or shapes do not verify (the reader would refuse it), and
    ReleaseExistsError (a FileExistsError) when `path` exists or is created by anyone else before the
    final step: an existing file is never overwritten. A write the environment refuses (a full disk,
    a read-only or unwritable folder) raises the matching `mepf_core.errors.FileAccessError`
    (DiskFullError, ReadOnlyFileSystemError, NotWritableError, ...) naming `path`; no file, partial
    or temporary, is left.
    """
    names = {p.name for p in metadata.parts}
    if set(noisy) != names:
        raise ValueError(f"arrays {sorted(noisy)} do not match metadata parts {sorted(names)}")
    signer_name = signing.validate_signer_name(signer_name)
    if signer_name and signing_key is None:
        raise ValueError("signer_name needs a signing key")
    parts = []
    for p in metadata.parts:
        arr = np.asarray(noisy[p.name], dtype=np.float64)
        if arr.shape != tuple(p.shape):
            raise ValueError(f"part {p.name} has shape {arr.shape}, metadata says {p.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"part {p.name} holds non-finite values; refusing to write a release")
        parts.append(PartRecord(**{**asdict(p), "shape": tuple(p.shape), "sha256": _sha256(arr)}))
    meta = ReleaseMetadata(**{**metadata.__dict__, "parts": tuple(parts)})
    check_metadata(meta)  # never write what the reader would refuse
    for p in meta.parts:
        if not on_lattice(noisy[p.name], p.lattice_unit):
            raise ValueError(f"part {p.name} holds values off its lattice (integer x {p.lattice_unit!r}); refusing to write")
    check_sums_within_bounds(meta, {name: np.asarray(v, dtype=np.float64) for name, v in noisy.items()})
    text = meta.to_json()
    path = Path(path)
    try:
        with atomic_path(path, exclusive=True) as tmp:
            with h5py.File(tmp, "w") as f:
                for p in meta.parts:  # contiguous, unfiltered: what the reader requires
                    f.create_dataset(p.name, data=np.asarray(noisy[p.name], dtype=np.float64))
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["metadata_json"] = text
                f.attrs["metadata_sha256"] = hashlib.sha256(text.encode()).hexdigest()
                if signing_key is not None:
                    public = signing_key.public_key()
                    f.attrs["signature"] = signing.sign(signing_key, text, signer_name).hex()
                    f.attrs["signer_public_key"] = signing.public_key_bytes(public).hex()
                    f.attrs["signer_fingerprint"] = signing.fingerprint(public)
                    f.attrs["signer_name"] = signer_name
    except TargetExistsError as exc:
        raise ReleaseExistsError(f"release {meta.release_id} was not written: {exc}") from None
    return path


# --- reading -------------------------------------------------------------------------------------

def _str_attr(value, name: str) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise ReleaseSchemaError(f"attribute {name!r} must be a string")


def _check_structure(path: Path, f: h5py.File) -> dict[str, h5py.Dataset]:
    """Root attributes and links; each object a plain, contiguous, unfiltered, local dataset."""
    allowed = set(REQUIRED_ATTRS) | set(SIGNATURE_ATTRS)
    extra = sorted(set(f.attrs) - allowed)
    if extra:
        raise ReleaseSchemaError(f"{path}: unexpected attribute(s) {', '.join(map(repr, extra))}")
    datasets = {}
    for name in f:  # link names only: nothing is resolved yet
        if name not in PART_NAMES:
            raise ReleaseSchemaError(f"{path}: unexpected dataset {name!r}")
        link = f.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise ReleaseStorageError(f"{path}: {name!r} is a {type(link).__name__}, not a dataset stored in the "
                                      "file (links are refused)")
        obj = f.get(name)
        if not isinstance(obj, h5py.Dataset):
            raise ReleaseSchemaError(f"{path}: {name!r} is not a dataset")
        if obj.is_virtual:
            raise ReleaseStorageError(f"{path}: dataset {name!r} is virtual (maps other files); refused")
        if obj.external:
            raise ReleaseStorageError(f"{path}: dataset {name!r} stores its data in external files; refused")
        plist = obj.id.get_create_plist()
        if plist.get_nfilters() > 0:
            raise ReleaseStorageError(f"{path}: dataset {name!r} is filtered (compression {obj.compression!r}); "
                                      "releases are never compressed, refused before reading")
        if plist.get_layout() != h5py.h5d.CONTIGUOUS:
            raise ReleaseStorageError(f"{path}: dataset {name!r} is not stored contiguously (chunked or compact); "
                                      "refused before reading")
        datasets[name] = obj
    return datasets


def _check_dataset(path: Path, name: str, ds: h5py.Dataset, part: PartRecord) -> None:
    """dtype, shape and stored bytes against the (checksummed) metadata, before reading any data."""
    if ds.dtype != np.float64:
        raise ReleaseSchemaError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected float64")
    if ds.shape != tuple(part.shape):
        raise ReleaseSchemaError(f"{path}: dataset {name!r} has shape {ds.shape}, expected {part.shape}")
    raw = int(np.prod(part.shape, dtype=np.int64)) * 8
    stored = ds.id.get_storage_size()
    if stored != raw:
        raise ReleaseStorageError(f"{path}: dataset {name!r} stores {stored} bytes for {raw} bytes of data; "
                                  "refused before reading")


def _resolve_trusted(trusted_keys) -> list[tuple[str, bytes]] | None:
    if trusted_keys is None:
        return None
    if isinstance(trusted_keys, (str, os.PathLike)):
        trusted_keys = [trusted_keys]
    keys = []
    for k in trusted_keys:
        key = k if isinstance(k, signing.Ed25519PublicKey) else signing.load_public_key(k)
        keys.append((signing.fingerprint(key), signing.public_key_bytes(key)))
    if not keys:
        raise InvalidArgumentError("trusted_keys must name at least one public key when given")
    return keys


def _check_signature(path: Path, attrs: dict, text: str, trusted: list[tuple[str, bytes]] | None) -> SignatureInfo:
    present = [a for a in SIGNATURE_ATTRS if a in attrs]
    if not present:
        if trusted is not None:
            raise ReleaseUntrustedError(f"{path} is not signed, and a signature by a trusted key is required "
                                        f"({', '.join(fp for fp, _ in trusted)})")
        return UNSIGNED
    if len(present) != len(SIGNATURE_ATTRS):
        missing = sorted(set(SIGNATURE_ATTRS) - set(present))
        raise ReleaseSignatureError(f"{path}: incomplete signature, missing {', '.join(missing)}")
    try:
        signature = bytes.fromhex(_str_attr(attrs["signature"], "signature"))
        raw_key = bytes.fromhex(_str_attr(attrs["signer_public_key"], "signer_public_key"))
        public = signing.public_key_from_bytes(raw_key)
    except (ValueError, ReleaseSchemaError) as exc:
        raise ReleaseSignatureError(f"{path}: malformed signature attributes ({exc})") from None
    fp = _str_attr(attrs["signer_fingerprint"], "signer_fingerprint")
    name = _str_attr(attrs["signer_name"], "signer_name")
    try:  # printed by `mepf inspect`: no terminal control characters from an untrusted file
        signing.validate_signer_name(name)
    except ValueError as exc:
        raise ReleaseSignatureError(f"{path}: {exc}") from None
    if fp != signing.fingerprint(public):
        raise ReleaseSignatureError(f"{path}: signer_fingerprint {fp!r} is not the fingerprint of the embedded key")
    if len(signature) != signing.SIGNATURE_BYTES or not signing.verify(public, signature, text, name):
        raise ReleaseSignatureError(f"{path}: the signature by {fp} does not verify; the release was changed "
                                    "after it was signed")
    is_trusted = None
    if trusted is not None:
        is_trusted = any(raw == raw_key for _, raw in trusted)
        if not is_trusted:
            raise ReleaseUntrustedError(f"{path} is signed by {fp} ({name or 'no name'}), which is not a trusted key "
                                        f"({', '.join(t for t, _ in trusted)})")
    return SignatureInfo(signed=True, fingerprint=fp, signer=name, trusted=is_trusted)


# Tail of the bound below, in standard deviations: each part fails it with probability < 2e-22.
SUMS_BOUND_SIGMAS = 10.0


def check_sums_within_bounds(meta: ReleaseMetadata, noisy: dict[str, np.ndarray]) -> None:
    """Refuse noisy sums larger than the recorded norm bound allows (ReleaseClaimError).

    A forger who records a tiny norm bound (so a tiny sensitivity and sigma still "give" a small
    epsilon) and writes exact sums of unit-norm features passes every check of the claim alone; the
    sums themselves give it away. For class c, part p with per-record bound C_p (shapes K x D, K):

        S~_c = S_c + g,   ||S_c|| <= N_c C_p            (N_c records, each of norm <= C_p)
        N_c <= N~_c + T sigma_N                          (fails w.p. <= exp(-T^2 / 2); exact counts: sigma_N = 0)
        ||g|| <= sigma_p (sqrt(D) + T)                   (fails w.p. <= exp(-T^2 / 2), below)

    The noise is discrete Gaussian, which is sub-Gaussian with parameter sigma: E exp(t g_j) <=
    exp(t^2 sigma^2 / 2) (Canonne, Kamath & Steinke 2020, Cor. 9). That gives the count tail by Chernoff, and
    E exp(l g_j^2) <= (1 - 2 l sigma^2)^-1/2 (average the bound over t ~ N(0, 2l)), the chi-square MGF, so
    the Chernoff bound behind Laurent & Massart 2000 (Lemma 1) holds for ||g||^2 / sigma^2:
    P(||g||^2 >= sigma^2 (D + 2 sqrt(D x) + 2 x)) <= exp(-x); at x = T^2 / 2 the radius is <= sigma (sqrt D + T).
    So an honest release has ||S~_c|| <= C_p max(N~_c + T sigma_N, 0) + sigma_p (sqrt(D) + T) except
    with probability < 2e-22 per part and class at T = 10.
    This checks consistency, not honesty: it cannot see noise that was never drawn on sums that fit.
    """
    counts, t = noisy["counts"], SUMS_BOUND_SIGMAS
    sigma_counts = meta.part("counts").sigma
    records = np.maximum(counts + t * sigma_counts, 0.0)  # upper confidence bound of N_c
    bounds = {"moment1": meta.norm_bound, "moment2": meta.second_moment_bound}
    for p in meta.parts:
        if p.name == "counts":
            continue
        sums = noisy[p.name]
        allowed = bounds[p.name] * records + p.sigma * (math.sqrt(sums.shape[1]) + t)
        norms = np.linalg.norm(sums, axis=1)
        if np.any(norms > allowed * (1 + 1e-9)):
            c = int(np.argmax(norms - allowed))
            raise ReleaseClaimError(
                f"part {p.name!r}, class {c}: the released sum has norm {norms[c]:.6g}, but with the recorded bound "
                f"{bounds[p.name]!r} per record, the noisy counts and sigma {p.sigma!r} it can be at most "
                f"{allowed[c]:.6g}: the recorded bound is not the one the sums were made with")


def read_release(path: str | os.PathLike, *, trusted_keys=None) -> Release:
    """Read and fully validate a release (see the module docstring for every check, in order).

    trusted_keys: None (signature optional; a present one must still verify), or one or more
    public keys (paths to PEM files, or Ed25519PublicKey objects): the release must then be signed
    by one of them. Returns a Release with float64 arrays (K x D moments, K counts), its
    SignatureInfo and the recomputed epsilon. Raises FileNotFoundError (no file), ReleaseCorruptError,
    ReleaseSchemaError / ReleaseStorageError, ReleaseClaimError, ReleaseSignatureError,
    ReleaseUntrustedError (all ReleaseError), and signing.SigningKeyError for an unusable trusted key.
    A healthy file the environment will not let us read is never called corrupt: an OSError with an
    errno (permission denied, locked by a writer, an I/O error) raises the matching
    `mepf_core.errors.FileAccessError` (PermissionDeniedError, FileLockedError, ...); h5py reports
    damage without an errno.
    """
    path = Path(path)
    trusted = _resolve_trusted(trusted_keys)
    if not path.is_file():
        raise PathNotFoundError(f"release file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            datasets = _check_structure(path, f)
            attrs = {k: f.attrs[k] for k in f.attrs}
            meta, text = _parse_metadata(path, attrs)
            try:
                epsilon = check_metadata(meta)
            except ReleaseError as exc:
                raise type(exc)(f"{path}: {exc}") from None
            sig = _check_signature(path, attrs, text, trusted)
            arrays = {}
            for p in meta.parts:
                if p.name not in datasets:
                    raise ReleaseSchemaError(f"{path}: dataset {p.name!r} is missing")
                _check_dataset(path, p.name, datasets[p.name], p)
            if set(datasets) != {p.name for p in meta.parts}:
                raise ReleaseSchemaError(f"{path}: datasets {sorted(datasets)} do not match metadata")
            for p in meta.parts:
                arrays[p.name] = datasets[p.name][()]
    except ReleaseError:
        raise
    except OSError as exc:  # with an errno it is the environment (permission, a lock, EIO), not damage
        mapped = file_access_error(exc, f"cannot read release file {path}", path)
        if mapped is not None:
            raise mapped from exc
        raise ReleaseCorruptError(f"{path} is not a readable release file ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # h5py raises OSError/KeyError/RuntimeError on damaged files
        raise ReleaseCorruptError(f"{path} is not a readable release file ({type(exc).__name__}: {exc})") from None
    for p in meta.parts:
        if _sha256(arrays[p.name]) != p.sha256:
            raise ReleaseCorruptError(f"{path}: checksum of dataset {p.name!r} does not match")
        if not np.all(np.isfinite(arrays[p.name])):
            raise ReleaseCorruptError(f"{path}: dataset {p.name!r} holds non-finite values")
        if not on_lattice(arrays[p.name], p.lattice_unit):
            raise ReleaseClaimError(f"{path}: dataset {p.name!r} holds values off its lattice (integer x "
                                    f"{p.lattice_unit!r}): its noise was not drawn on the integers")
    if meta.n_public is not None and not np.array_equal(arrays["counts"], np.array([float(meta.n_public)])):
        raise ReleaseClaimError(f"{path}: the exact counts do not equal the recorded public n")
    try:
        check_sums_within_bounds(meta, arrays)
    except ReleaseClaimError as exc:
        raise ReleaseClaimError(f"{path}: {exc}") from None
    return Release(path, meta, arrays, sig, epsilon)


def _parse_metadata(path: Path, attrs: dict) -> tuple[ReleaseMetadata, str]:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ReleaseSchemaError(f"{path}: missing attribute(s) {', '.join(missing)}")
    version = attrs["schema_version"]
    try:
        version_ok = int(version) == SCHEMA_VERSION
    except (TypeError, ValueError):
        raise ReleaseCorruptError(f"{path}: damaged schema_version attribute") from None
    if not version_ok:
        raise ReleaseSchemaError(f"{path}: {_version_message(version)}")
    text = _str_attr(attrs["metadata_json"], "metadata_json")  # damaged bytes: UnicodeError -> corrupt
    digest = _str_attr(attrs["metadata_sha256"], "metadata_sha256")
    if hashlib.sha256(text.encode()).hexdigest() != digest:
        raise ReleaseCorruptError(f"{path}: metadata checksum does not match")
    try:
        meta = ReleaseMetadata.from_json(text)
    except ReleaseError:
        raise
    except Exception as exc:  # e.g. RecursionError on deeply nested JSON
        raise ReleaseCorruptError(f"{path}: damaged metadata ({type(exc).__name__})") from None
    return meta, text
