"""The dataset card (`DATASET_CARD.md`) beside every synthetic export: what it is, what protects it, how good it is.

Where (`card_path`): an image folder holds its card, `DIR/DATASET_CARD.md`; a file export gets one beside
it named after the file, `synthetic.h5` -> `synthetic.h5.DATASET_CARD.md`, so two exports in one folder
(`synthetic.h5` and `synthetic.parquet`) never share or overwrite one card.

What: the privacy claim (epsilon, delta, neighbouring relation), the release (id, SHA-256 of its file), the
encoder (name, SHA-256 of its weights), the generator's training steps, checkpoint and sampling seed, the
code version (package version and git commit when the code runs from a git checkout), what the guarantee
covers and what it does not, intended use and limitations, and the measured utility. Only public facts:
everything comes from the export's provenance (storage.provenance.SyntheticInfo, itself read from the
release) and from the synthetic images; nothing about the private data (no n, no class counts).

Utility is not known when the export is drawn: the card then says "not measured yet" and how to measure
it. `record_utility` (called by the evaluate flow) replaces that section, between the markers
UTILITY_START and UTILITY_END, with the FID (and the image counts it used) and the accuracies, leaving
the rest of the card as written at sampling time.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mepf_core.errors import InvalidArgumentError
from storage.atomic import atomic_write_bytes
from storage.provenance import SyntheticInfo
from storage.synthetic import FOLDER, export_format

CARD_NAME = "DATASET_CARD.md"
UTILITY_START = "<!-- dp-mepf:utility:start -->"
UTILITY_END = "<!-- dp-mepf:utility:end -->"
_FORMAT_NAMES = {".h5": "HDF5 (`images` uint8 N x C x H x W, `labels` int64; h5py)",
                 ".parquet": "Parquet (`image` {bytes, path} PNG, `label` int64; pyarrow, Hugging Face `datasets`)",
                 ".npz": "NumPy .npz (`x` uint8 N x H x W x C, `y` int64, `class_names`; numpy.load)",
                 FOLDER: "image folder (one PNG subfolder per class; torchvision ImageFolder)"}
_RELATIONS = {
    "add-remove": "add-remove: neighbouring datasets differ by adding or removing one record (one image with its "
                  "label)",
    "replace-one": "replace-one: neighbouring datasets have the same size and differ in one record replaced",
}
_METRIC_NAMES = {"acc_logreg": "a logistic regression", "acc_mlp": "an MLP", "acc_cnn": "a CNN"}


def card_path(export: str | os.PathLike) -> Path:
    """The card of a synthetic export: DIR/DATASET_CARD.md for an image folder, NAME.DATASET_CARD.md beside a file
    (InvalidArgumentError when `export` names no synthetic format)."""
    path = Path(export)
    if export_format(export) == FOLDER:
        return path / CARD_NAME
    return path.with_name(f"{path.name}.{CARD_NAME}")


def code_version(package_dir: str | os.PathLike | None = None) -> str:
    """"dp-mepf VERSION, git COMMIT" (", uncommitted changes" when the checkout differs from COMMIT), or
    "dp-mepf VERSION, git commit unknown (...)" when git is absent, times out or the code is no checkout."""
    from importlib import metadata

    from mepf_core import __version__

    try:
        version = metadata.version("dp-mepf")
    except metadata.PackageNotFoundError:
        version = __version__
    where = str(package_dir or Path(__file__).resolve().parent)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10, check=False)

    try:
        head = git("rev-parse", "--verify", "HEAD")
        if head.returncode != 0:
            return f"dp-mepf {version}, git commit unknown (not a git checkout)"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:  # git not installed, or too slow
        return f"dp-mepf {version}, git commit unknown ({type(exc).__name__})"
    return f"dp-mepf {version}, git {head.stdout.strip()}" + (", uncommitted changes" if dirty else "")


@dataclass(frozen=True)
class Utility:
    """Measured utility of a synthetic export, for its card.

    reference: the real split it was measured against ("fashion-mnist:test"); metrics: {"fid": float,
    "acc_logreg": fraction in [0, 1], ...}; fid_counts: (synthetic, reference) images the FID used (None
    without FID); report: the evaluation report's path; private_reference: the reference reads training
    records (then the card records no number: it holds only public facts).
    """

    reference: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    fid_counts: tuple[int, int] | None = None
    report: str | None = None
    private_reference: bool = False


def _num(x: float | None) -> str:
    return "none (not differentially private)" if x is None else f"{x:g}"


def _or_unknown(value, what: str = "not recorded") -> str:
    return f"`{value}`" if value not in (None, "") else what


def render_card(export: str | os.PathLike, info: SyntheticInfo, *, count: int, image_shape: tuple[int, int, int],
                run: str | os.PathLike | None = None, utility: Utility | None = None,
                version: str | None = None) -> str:
    """The card's Markdown. export: the export's path (its name and format); info: its provenance; count:
    synthetic images in it; image_shape: (C, H, W); run: the run it was drawn from (for the how-to-measure
    command); utility: None -> "not measured yet"; version: code_version() when None."""
    fmt = export_format(export)
    name = Path(export).name + ("/" if fmt == FOLDER else "")
    c, h, w = image_shape
    classes = ("no (one unlabelled set)" if info.class_names is None
               else f"yes, {len(info.class_names)} classes: " + ", ".join(f"`{n}`" for n in info.class_names))
    relation = (_RELATIONS.get(info.neighbouring, info.neighbouring) if info.neighbouring
                else "not recorded (an export written before relations were recorded)")
    lines = [
        f"# Dataset card: `{name}`",
        "",
        "Synthetic images drawn from a generator trained with DP-MEPF (differentially private mean embeddings",
        "of pre-trained perceptual features, Harder et al., TMLR 2023; package `dp-mepf`) from one",
        "differentially private release alone.",
        "",
        "| field | value |",
        "|---|---|",
        f"| format | {_FORMAT_NAMES[fmt]} |",
        f"| images | {count:,} synthetic, {c} x {h} x {w} (C x H x W), uint8 |",
        f"| labelled | {classes} |",
        f"| epsilon | {_num(info.epsilon)} |",
        f"| delta | {_num(info.delta)} |",
        f"| neighbouring relation | {relation} |",
        f"| release id | `{info.release_id}` |",
        f"| release SHA-256 (of the release file) | {_or_unknown(info.release_sha256)} |",
        f"| budget charged (dataset id) | {_or_unknown(info.dataset_id)} |",
        f"| encoder | `{info.encoder}` |",
        f"| encoder weights SHA-256 | {_or_unknown(info.encoder_weights_sha256)} |",
        f"| generator training steps | {info.steps:,} |",
        f"| checkpoint, sampling seed | {_or_unknown(info.checkpoint)}, {_or_unknown(info.seed)} |",
        f"| code version (sampling) | {version or code_version()} |",
        "",
        "## What the guarantee covers",
        "",
        f"- The release this generator was trained from is (epsilon, delta) = ({_num(info.epsilon)}, "
        f"{_num(info.delta)})-differentially private with respect to the custodian's private dataset, under "
        "the neighbouring relation above: changing that dataset by one record (as the relation defines it) "
        "changes the distribution of the release by at most that much.",
        "- Everything here is post-processing of that release: the generator was trained from the release file "
        "alone and these images were sampled from the generator, so the images, their labels and this card "
        "carry the same guarantee, whatever is done with them and however many images are drawn.",
        "",
        "## What it does not cover",
        "",
        f"- The encoder's pretraining data (`{info.encoder}`; ImageNet for the built-in efficientnet-lite0 and "
        "vgg19): public data used without privacy protection.",
        "- The public evaluation split (the FID reference and the test set of the accuracies below): public, "
        "unprotected, and the measured utility describes it.",
        "- Hyperparameters and choices made on public data (encoder, steps, learning rate, the choice of "
        "epsilon): unprotected; any choice made by looking at the private data, or a release re-run until "
        "its result looked good, is outside the guarantee (each release must be charged to the budget).",
        "- More than one record per person: protection weakens with the number of records a person "
        "contributed (group privacy), and other releases of the same data compose (the budget ledger counts "
        "those made with this code).",
        "- The honesty of the custodian's processing: a signed release proves who made it, not that it was "
        "made by this code.",
        *([f"- The channel count ({c}): chosen from the private images (1 when every one is grayscale, else 3; "
           "`image_mode_source: inferred-from-data` in the release), one bit of the data that the custodian "
           "declared public and that epsilon does not cover."] if info.image_mode_source == "inferred-from-data"
          else []),
        "",
        "## Intended use and limitations",
        "",
        "- Intended: sharing, prototyping and testing models and pipelines where the private images cannot be "
        "shared; benchmarking differentially private image generation.",
        *(["- Class-balanced: each class was drawn equally often, so class proportions say nothing about the "
           "private data's."] if info.class_names is not None else []),
        "- Lower fidelity than real data: a model trained on these images is usually less accurate than one "
        "trained on real data (see the measured utility); validate on real data before any decision.",
        "- Labels are the generator's conditioning labels, not checked by anyone.",
        "- Not for decisions about individuals.",
        "",
        "## Measured utility",
        "",
        UTILITY_START,
        *_utility_lines(export, run, utility),
        UTILITY_END,
        "",
    ]
    return "\n".join(lines)


def _utility_lines(export: str | os.PathLike, run, utility: Utility | None) -> list[str]:
    if utility is None:
        run_arg = str(run) if run is not None else "RUN"
        return ["Not measured yet. Measure it on a public test split (this updates this section):", "",
                "```bash",
                f"mepf evaluate --run {run_arg} --synthetic {os.fspath(export)} --reference DATASET:test --out DIR",
                "```",
                "(e.g. `--reference fashion-mnist:test`): the FID against that split and the accuracy on it of "
                "classifiers trained on these images."]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if utility.private_reference:
        return [f"Measured by `mepf evaluate` on {when} against `{utility.reference}`, a reference that reads "
                "training records (`--allow-private-reference`): its numbers are not recorded in this card, which "
                "holds only public facts" + (f"; see `{utility.report}`." if utility.report else ".")]
    lines = [f"Measured by `mepf evaluate` on {when} against the real split `{utility.reference}`:", "",
             "| metric | value |", "|---|---|"]
    for key, value in utility.metrics.items():
        if key == "fid":
            counts = (f" ({utility.fid_counts[0]:,} synthetic vs {utility.fid_counts[1]:,} reference images)"
                      if utility.fid_counts else "")
            lines.append(f"| FID (lower is better) | {value:.2f}{counts} |")
        elif key.startswith("acc_"):
            model = _METRIC_NAMES.get(key, f"a {key[4:]} classifier")
            lines.append(f"| accuracy on `{utility.reference}` of {model} trained on these images "
                         f"| {100 * value:.1f}% |")
        else:
            lines.append(f"| {key} | {value:g} |")
    if not utility.metrics:
        lines.append("| (no metric computed) | |")
    if utility.report:
        lines += ["", f"Full report: `{utility.report}`."]
    return lines


def write_dataset_card(export: str | os.PathLike, info: SyntheticInfo, *, count: int,
                       image_shape: tuple[int, int, int], run: str | os.PathLike | None = None,
                       utility: Utility | None = None) -> Path:
    """Write (atomically, replacing an older one) the card of `export` (`render_card`'s arguments); returns its path."""
    path = card_path(export)
    text = render_card(export, info, count=count, image_shape=image_shape, run=run, utility=utility)
    atomic_write_bytes(path, text.encode())
    return path


def record_utility(export: str | os.PathLike, utility: Utility, *, info: SyntheticInfo | None = None,
                   count: int | None = None, image_shape: tuple[int, int, int] | None = None) -> Path:
    """Put `utility` into the card of `export`, replacing its utility section (the rest stays as written).

    A card lacking the section's markers, or no card (an export drawn before cards existed), is written
    anew from `info`, `count` and `image_shape`; InvalidArgumentError when those are not given then.
    """
    path = card_path(export)
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(UTILITY_START) + r".*?" + re.escape(UTILITY_END), re.S)
    if pattern.search(text):
        section = "\n".join([UTILITY_START, *_utility_lines(export, None, utility), UTILITY_END])
        atomic_write_bytes(path, pattern.sub(lambda _: section, text, count=1).encode())
        return path
    if info is None or count is None or image_shape is None:
        raise InvalidArgumentError(f"{path} has no utility section to update; pass info, count and image_shape "
                                   "to write the card anew")
    return write_dataset_card(export, info, count=count, image_shape=tuple(image_shape), utility=utility)
