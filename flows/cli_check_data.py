"""`mepf check-data`: the custodian's local look at a private dataset (registered by flows.cli).

Runs in the custodian's own process, WITHOUT Prefect: its output names files, classes and counts,
which must never reach a Prefect server (the release's own errors only point here). It lists what a
release would count as records and what it would refuse or skip:

- undecodable image files (a release stops on the first one),
- hidden files and folders skipped (names starting with `.` at any depth, `__MACOSX`, AppleDouble `._*`),
  symbolic links skipped, extra hard-link names of one file (counted once),
- duplicate records by content (SHA-256 of the file's bytes, or of the pixels for array datasets):
  each copy is a separate record, so one person's image in two files counts twice,
- empty class folders and fewer than 2 classes (a labelled release refuses both).

Exit status 0 when a release would accept the dataset, 1 when it would refuse it, 2 on bad arguments.
"""

from __future__ import annotations

import hashlib
import sys
from collections import defaultdict

CHUNK = 512


def add_check_data_subcommand(sub) -> None:
    p = sub.add_parser("check-data", help="custodian, local only (no Prefect): list undecodable, hidden, "
                                          "duplicate and empty-class problems of a private dataset")
    p.add_argument("--dataset", required=True, help="fashion-mnist | mnist | cifar10 | celeba | imagefolder:PATH")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    p.add_argument("--labelled", action="store_true", help="check as for a labelled release (classes)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_check_data)


def _imagefolder_report(spec: str, split: str) -> dict:
    from storage.datasets import CorruptImageError, _decode_image, scan_imagefolder

    scan = scan_imagefolder(spec.split(":", 1)[1], split)
    undecodable, by_hash = [], defaultdict(list)
    for f in scan.files:
        by_hash[hashlib.sha256(f.read_bytes()).hexdigest()].append(str(f))
        try:
            _decode_image(f, 32)
        except CorruptImageError as exc:
            undecodable.append({"file": str(f), "error": str(exc)})
    return {
        "folder": str(scan.folder), "class_names": list(scan.class_names), "labels": list(scan.labels),
        "undecodable": undecodable,
        "duplicates": [paths for paths in by_hash.values() if len(paths) > 1],
        "hidden_skipped": [str(p) for p in scan.hidden],
        "symlinks_skipped": [str(p) for p in scan.symlinks],
        "hard_links_counted_once": [{"file": str(a), "same_file_as": str(b)} for a, b in scan.hard_links],
        "not_images_skipped": [str(p) for p in scan.other_files],
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
            "hidden_skipped": [], "symlinks_skipped": [], "hard_links_counted_once": [], "not_images_skipped": []}


def check_data(dataset: str, split: str = "train", root: str | None = None, labelled: bool = False) -> dict:
    """The report `mepf check-data` prints (see the module docstring). Local use only."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset.startswith("imagefolder:"):
        report = _imagefolder_report(dataset, split)
    else:
        report = _array_report(dataset, split, root)
    labels = report.pop("labels")
    names = report["class_names"]
    counts = {name: 0 for name in names}
    for k in labels:
        counts[names[k]] += 1
    problems = [f"{len(report['undecodable'])} undecodable image file(s): a release stops on the first"] \
        if report["undecodable"] else []
    empty = [name for name, c in counts.items() if c == 0]
    if labelled:
        if len(names) < 2:
            problems.append(f"a labelled release needs at least 2 classes, the dataset has {len(names)}")
        problems += [f"class {name!r} holds no images (a labelled release would spend budget on pure noise)"
                     for name in empty]
    warnings = [f"{len(g)} files with the same content: {', '.join(g)}" for g in report["duplicates"]]
    return {"dataset": dataset, "split": split, "labelled": labelled, "records": len(labels),
            "class_counts": counts, "empty_classes": empty, **report, "problems": problems,
            "warnings": warnings, "ok": not problems}


def _human(r: dict) -> str:
    lines = [f"{r['dataset']} ({r['split']}){' in ' + r['folder'] if r['folder'] else ''}: {r['records']} records "
             f"in {len(r['class_counts'])} classes",
             *(f"  class {name!r}: {c}" for name, c in r["class_counts"].items())]
    for key, title in (("hidden_skipped", "hidden, skipped"), ("symlinks_skipped", "symbolic links, skipped"),
                       ("not_images_skipped", "not images, skipped")):
        lines += [f"  {title}: {p}" for p in r[key]]
    lines += [f"  hard link, counted once: {h['file']} (same file as {h['same_file_as']})"
              for h in r["hard_links_counted_once"]]
    lines += [f"  undecodable: {u['file']}: {u['error']}" for u in r["undecodable"]]
    lines += [f"  warning: {w}" for w in r["warnings"]]
    lines += [f"  problem: {p}" for p in r["problems"]]
    lines.append("  OK: a release would accept this dataset" if r["ok"] else "  REFUSED: a release would refuse this dataset")
    return "\n".join(lines)


def _cmd_check_data(args) -> dict:
    from flows.cli import _emit

    report = check_data(args.dataset, args.split, args.data_root, args.labelled)
    _emit(report, args.json, _human)
    if not report["ok"]:
        sys.stdout.flush()
        raise SystemExit(1)
    return report
