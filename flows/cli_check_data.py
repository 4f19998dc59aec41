"""`mepf check-data`: the custodian's local look at a private dataset (registered by flows.cli).

Runs in the custodian's own process, WITHOUT Prefect: its output names files, classes and counts,
which must never reach a Prefect server (the release's own errors only point here). It lists what a
release would count as records and what it would refuse or skip:

- undecodable image files, files over a decoding limit (storage.datasets: MAX_RECORD_BYTES, ...) and
  files that cannot be read (permission denied, an I/O error): a release counts each as a record with
  zero features; so does a labelled release with a record whose label is outside the classes (a damaged
  idx label byte), in the first class,
- hidden and tool-made files and folders skipped, at any depth (names starting with `.`, `@`, `$`, `~`:
  `.ipynb_checkpoints/`, AppleDouble `._*`, Synology `@eaDir/`, Windows `$RECYCLE.BIN/`, Office `~$*`;
  `__MACOSX/`, `System Volume Information/`, `lost+found/`, ...: `storage.datasets.is_hidden_name`),
  symbolic links skipped, extra hard-link names of one file (counted once),
- folders that could not be listed or examined: a release refuses the dataset rather than skip them,
- images in nested subfolders of a class folder (a warning: copies made by hand or by tools hide
  there, and each copy is one more record of the same person),
- duplicate records by content (SHA-256 of the file's bytes, or of the pixels for array datasets):
  each copy is a separate record, so one person's image in two files counts twice,
- empty classes and fewer than 2 classes (a labelled release refuses both), among the records a release
  would read: with `--limit N` (as `mepf release --limit N`, replace-one) the first N records.

Exit status 0 when a release would accept the dataset, 1 when it would refuse it, 2 on bad arguments.
"""

from __future__ import annotations

import hashlib
import sys
from collections import defaultdict

from mepf_core.errors import InvalidArgumentError

CHUNK = 512


def add_check_data_subcommand(sub) -> None:
    p = sub.add_parser("check-data", help="custodian, local only (no Prefect): list undecodable, hidden, "
                                          "duplicate and empty-class problems of a private dataset")
    p.add_argument("--dataset", required=True, help="fashion-mnist | mnist | cifar10 | celeba | imagefolder:PATH")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    p.add_argument("--labelled", action="store_true", help="check as for a labelled release (classes)")
    p.add_argument("--limit", type=int, default=None,
                   help="check as for a release with --limit N (only the first N records are released)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_check_data)


def _imagefolder_report(spec: str, split: str) -> dict:
    from storage.datasets import CorruptImageError, _decode_image, scan_imagefolder

    scan = scan_imagefolder(spec.split(":", 1)[1], split)  # unreadable entries are listed, not raised
    undecodable, by_hash = [], defaultdict(list)
    unreadable = [{"path": str(p), "error": why} for p, why in scan.unreadable]
    for f in scan.files:
        try:  # as a release reads it: any failure is a zero-feature record
            _decode_image(f, 32)
        except CorruptImageError as exc:
            undecodable.append({"file": str(f), "error": str(exc)})
        try:
            with open(f, "rb") as fh:
                by_hash[hashlib.file_digest(fh, "sha256").hexdigest()].append(str(f))
        except OSError:
            pass  # listed as undecodable (cannot be read) above
    return {
        "folder": str(scan.folder), "class_names": list(scan.class_names), "labels": list(scan.labels),
        "undecodable": undecodable,
        "duplicates": [paths for paths in by_hash.values() if len(paths) > 1],
        "hidden_skipped": [str(p) for p in scan.hidden],
        "symlinks_skipped": [str(p) for p in scan.symlinks],
        "hard_links_counted_once": [{"file": str(a), "same_file_as": str(b)} for a, b in scan.hard_links],
        "not_images_skipped": [str(p) for p in scan.other_files],
        "unreadable": unreadable,
        "nested_folders": [{"folder": str(folder), "class": folder.relative_to(scan.folder).parts[0], "images": n}
                           for folder, n in scan.nested_folders().items()],
    }


def _array_report(spec: str, split: str, root: str | None) -> dict:
    from storage.datasets import CorruptImageError, open_dataset

    src = open_dataset(spec, split, root)
    by_hash, undecodable = defaultdict(list), []
    for lo in range(0, len(src), CHUNK):
        hi = min(lo + CHUNK, len(src))
        try:
            chunk = src._reader(lo, hi)
        except CorruptImageError as exc:
            undecodable.append({"file": f"records {lo}..{hi - 1}", "error": str(exc)})
            continue
        for i, img in enumerate(chunk):
            by_hash[hashlib.sha256(img.tobytes()).hexdigest()].append(f"record {lo + i}")
    return {"folder": None, "class_names": list(src.class_names), "labels": src._labels.tolist(),
            "undecodable": undecodable, "duplicates": [v for v in by_hash.values() if len(v) > 1],
            "hidden_skipped": [], "symlinks_skipped": [], "hard_links_counted_once": [], "not_images_skipped": [],
            "unreadable": [], "nested_folders": []}


def check_data(dataset: str, split: str = "train", root: str | None = None, labelled: bool = False,
               limit: int | None = None) -> dict:
    """The report `mepf check-data` prints (see the module docstring). Local use only."""
    if split not in ("train", "test"):
        raise InvalidArgumentError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"limit must be >= 1, got {limit}")
    if dataset.startswith("imagefolder:"):
        report = _imagefolder_report(dataset, split)
    else:
        report = _array_report(dataset, split, root)
    names = report["class_names"]
    labels = [k if 0 <= k < len(names) else None for k in report.pop("labels")]  # None: a damaged idx label byte
    unknown = [i for i, k in enumerate(labels) if k is None]
    report["unknown_labels"] = [f"record {i}" for i in unknown]
    counts = {name: 0 for name in names}
    for k in labels:
        if k is not None:
            counts[names[k]] += 1
    problems = [f"{len(report['unreadable'])} folder(s) could not be listed or examined: a release "
                "refuses a folder it cannot read whole (fix the permissions or names, or move them out)"] \
        if report["unreadable"] else []
    if report["undecodable"]:
        problems.append(f"{len(report['undecodable'])} undecodable image file(s): a release counts each as a "
                        "record with zero features (it carries no information; fix or remove them first)")
    if labelled and unknown:
        problems.append(f"{len(unknown)} record(s) with a label outside the {len(names)} classes: a labelled "
                        "release counts each as a record of the first class with zero features")
    empty = [name for name, c in counts.items() if c == 0]
    released = labels if limit is None else labels[:limit]  # the records a release with --limit reads
    in_window = {name: 0 for name in names}
    for k in released:
        if k is not None:
            in_window[names[k]] += 1
    empty_released = [name for name, c in in_window.items() if c == 0]
    if labelled:
        if len(names) < 2:
            problems.append(f"a labelled release needs at least 2 classes, the dataset has {len(names)}")
        window = f" among the first {limit} records (--limit)" if limit is not None and limit < len(labels) else ""
        problems += [f"class {name!r} holds no images{window} (a labelled release would spend budget on pure noise)"
                     for name in empty_released]
    warnings = [f"{len(g)} files with the same content: {', '.join(g)}" for g in report["duplicates"]]
    warnings += [f"{f['images']} image(s) in the nested subfolder {f['folder']} of class {f['class']!r}: each is "
                 "a record; copies (by hand or by a tool) often hide in such folders" for f in report["nested_folders"]]
    return {"dataset": dataset, "split": split, "labelled": labelled, "limit": limit, "records": len(labels),
            "records_released": len(released), "class_counts": counts, "empty_classes": empty,
            "empty_classes_released": empty_released, **report, "problems": problems,
            "warnings": warnings, "ok": not problems}


def _human(r: dict) -> str:
    lines = [f"{r['dataset']} ({r['split']}){' in ' + r['folder'] if r['folder'] else ''}: {r['records']} records "
             f"in {len(r['class_counts'])} classes",
             *(f"  class {name!r}: {c}" for name, c in r["class_counts"].items())]
    lines += [f"  unreadable (a release refuses): {u['path']}: {u['error']}" for u in r["unreadable"]]
    for key, title in (("hidden_skipped", "hidden or tool-made, skipped"), ("symlinks_skipped", "symbolic links, skipped"),
                       ("not_images_skipped", "not images, skipped")):
        lines += [f"  {title}: {p}" for p in r[key]]
    lines += [f"  hard link, counted once: {h['file']} (same file as {h['same_file_as']})"
              for h in r["hard_links_counted_once"]]
    lines += [f"  undecodable: {u['file']}: {u['error']}" for u in r["undecodable"]]
    lines += [f"  label outside the classes: {u}" for u in r["unknown_labels"]]
    lines += [f"  warning: {w}" for w in r["warnings"]]
    lines += [f"  problem: {p}" for p in r["problems"]]
    lines.append("  OK: a release would accept this dataset" if r["ok"] else "  REFUSED: a release would refuse this dataset")
    return "\n".join(lines)


def _cmd_check_data(args) -> dict:
    from flows.cli_common import _emit

    report = check_data(args.dataset, args.split, args.data_root, args.labelled, args.limit)
    _emit(report, args.json, _human)
    if not report["ok"]:
        sys.stdout.flush()
        raise SystemExit(1)
    return report
