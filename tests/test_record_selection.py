"""Record selection keeps the neighbouring relation (issue 11, item 1).

- `limit` (the first N records): the worst-case add-remove neighbour, replayed through the release's
  own extraction (`tasks.custodian.shard_sums`), moves the sums and the counts by 1.4142 against
  claimed sensitivities 1.0 and 1.0; so a release with `limit` under add-remove is refused by name,
  before any image is read. Under replace-one every neighbour stays within the claimed 2C and sqrt 2.
- Hidden files and folders, symbolic links and extra hard-link names are never records.
"""

from __future__ import annotations

import itertools
import math
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import storage.datasets
from flows.cli import main
from mepf_core.privacy.mechanism import design_mechanism
from mepf_core.privacy.sensitivity import Neighbouring
from storage.datasets import canonical_dataset_id, open_dataset, scan_imagefolder
from storage.params import ReleaseParams
from tasks.custodian import shard_sums


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(path)


def _folder(root: Path, per_class: int = 4, classes=("a", "b")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, c in enumerate(classes):
        (root / c).mkdir()
        for i in range(per_class):
            _image(root / c / f"{i + 1:03d}.png", seed=100 * k + i)
    return root


def _window(folder: Path, limit: int = 6):
    """Un-noised sums of the first `limit` records, by the release's extraction. The window does not
    depend on the relation (only the mechanism's claim does); replace-one is the relation that allows it."""
    params = ReleaseParams(dataset=f"imagefolder:{folder}", target_epsilon=1.0, labelled=True, limit=limit,
                           neighbouring=Neighbouring.REPLACE_ONE, batch_size=4)
    sums = shard_sums(params, 0)
    return sums.values()["moment1"], sums.values()["counts"]


def _delta(a, b) -> tuple[float, float]:
    return float(np.linalg.norm(a[0] - b[0])), float(np.linalg.norm(a[1] - b[1]))


def _claimed(relation: Neighbouring) -> tuple[float, float]:
    mech = design_mechanism(target_epsilon=1.0, target_delta=1e-5, relation=relation, labelled=True, moments=1,
                            norm_bound=1.0, second_moment_bound=1.0)
    return mech.part("moment1").sensitivity, mech.part("counts").sensitivity


def test_first_n_breaks_add_remove_by_sqrt2(tmp_path):
    """The reproduction: 2 classes x 4 images, limit 6; adding one image whose name sorts first pushes
    b/002 out of the window. Measured through the release's own extraction (the window itself is the
    same under either relation; only the mechanism's claim differs)."""
    d = _folder(tmp_path / "d")
    before = _window(d)
    _image(d / "a" / "000.png", seed=999)  # D + x: x sorts first
    after = _window(d)
    sums_change, count_change = _delta(before, after)
    assert sums_change == pytest.approx(math.sqrt(2), abs=1e-5)  # 1.4142: one in, one out, each of norm C = 1 (to a lattice step)
    assert count_change == pytest.approx(math.sqrt(2), abs=1e-12)  # a +1, b -1
    assert _claimed(Neighbouring.ADD_REMOVE) == (1.0, 1.0)  # what an add-remove release would have claimed


def test_limit_is_refused_under_add_remove_by_name(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValidationError, match=r"limit=6 \(the first N images\) is not a per-record selection"):
        ReleaseParams(dataset="fashion-mnist", target_epsilon=1.0, limit=6)
    d = _folder(tmp_path / "d")

    def tripwire(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(storage.datasets, "_decode_image", tripwire)
    ledger = tmp_path / "ledger.jsonl"
    code = main(["release", "--dataset", f"imagefolder:{d}", "--target-epsilon", "1", "--out", str(tmp_path / "r.h5"),
                 "--labelled", "--limit", "6", "--ledger", str(ledger), "--budget", "5",
                 "--encoder", "efficientnet-lite0"])
    err = capsys.readouterr().err
    assert code == 2 and "limit=6" in err and "replace-one" in err and len(err.strip().splitlines()) == 1
    assert not ledger.exists() and not (tmp_path / "r.h5").exists()


def test_first_n_keeps_replace_one_within_the_claimed_sensitivities(tmp_path):
    """Every replacement of one record (by one sorting first, between, or last, in either class)
    changes the window by at most one swap: sums by <= 2C, counts by <= sqrt 2, both attained."""
    d = _folder(tmp_path / "d")
    base = _window(d)
    claimed_sums, claimed_counts = _claimed(Neighbouring.REPLACE_ONE)
    assert (claimed_sums, claimed_counts) == (2.0, pytest.approx(math.sqrt(2)))
    records = sorted(p.relative_to(d) for p in d.rglob("*.png"))
    worst_sums = worst_counts = 0.0
    for victim, (cls, name) in itertools.product(records[::3], [("a", "000.png"), ("a", "0025.png"), ("b", "000.png"),
                                                              ("b", "999.png")]):
        moved = tmp_path / "aside.png"
        (d / victim).rename(moved)  # D' = D - victim + new, the same size n
        new = d / cls / name
        _image(new, seed=7)
        sums_change, count_change = _delta(base, _window(d))
        worst_sums, worst_counts = max(worst_sums, sums_change), max(worst_counts, count_change)
        new.unlink()
        moved.rename(d / victim)
    assert worst_sums <= claimed_sums + 1e-9 and worst_counts <= claimed_counts + 1e-12
    assert worst_counts == pytest.approx(math.sqrt(2))  # a class change inside the window is attained
    assert worst_sums > 1.0  # well above the add-remove C: the claim is replace-one's, as it must be


def test_replace_one_window_records_its_size_as_public(tmp_path):
    """Unlabelled replace-one publishes n; with limit the released statistics cover min(n, N) records."""
    d = _folder(tmp_path / "d")
    params = ReleaseParams(dataset=f"imagefolder:{d}", target_epsilon=1.0, labelled=False, limit=6,
                           neighbouring=Neighbouring.REPLACE_ONE, batch_size=4)
    assert float(shard_sums(params, 0).counts.sum()) == 6.0
    big = params.model_copy(update={"limit": 100})
    assert float(shard_sums(big, 0).counts.sum()) == 8.0  # min(n, N) = n


# --- which files are records ------------------------------------------------------------------------

def test_hidden_files_folders_links_are_never_records(tmp_path):
    """2 classes x 10 visible images; hidden copies everywhere: 20 records (the old rglob read 25+)."""
    d = _folder(tmp_path / "d", per_class=10)
    ckpt = d / "a" / ".ipynb_checkpoints"
    ckpt.mkdir()
    for i in range(5):
        _image(ckpt / f"{i + 1:03d}-checkpoint.png", seed=i)
    (d / "b" / "._001.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # AppleDouble resource fork
    (d / "b" / ".DS_Store").write_bytes(b"junk")
    nested_hidden = d / "b" / "sub" / ".cache"
    nested_hidden.mkdir(parents=True)
    _image(nested_hidden / "x.png", seed=3)
    _image(d / "b" / "sub" / "visible.png", seed=4)  # a visible image in a visible subfolder is a record
    for hidden_class in (".trash", "__MACOSX"):
        (d / hidden_class / "a").mkdir(parents=True)
        _image(d / hidden_class / "a" / "._001.png", seed=5)
        _image(d / hidden_class / "img.png", seed=6)
    macosx = d / "a" / "__MACOSX"
    macosx.mkdir()
    _image(macosx / "001.png", seed=8)
    os.symlink(d / "a" / "001.png", d / "b" / "link-to-a-001.png")  # the same person, twice: not a record
    os.symlink(d / "a", d / "b" / "linked-folder")  # never followed
    os.link(d / "a" / "002.png", d / "a" / "002-hardlink.png")  # one file, two names: one record

    source = open_dataset(f"imagefolder:{d}")
    assert len(source) == 21 and source.class_names == ("a", "b")
    scan = scan_imagefolder(d)
    assert [p.relative_to(d).as_posix() for p in scan.files if p.parent.name == "sub"] == ["b/sub/visible.png"]
    assert sorted(p.relative_to(d).as_posix() for p in scan.hidden) == [
        ".trash", "__MACOSX", "a/.ipynb_checkpoints", "a/__MACOSX", "b/.DS_Store", "b/._001.png", "b/sub/.cache"]
    assert sorted(p.name for p in scan.symlinks) == ["link-to-a-001.png", "linked-folder"]
    # "002-hardlink.png" sorts before "002.png" ("-" < "."): that name is the record, the other is skipped
    assert [(a.name, b.name) for a, b in scan.hard_links] == [("002.png", "002-hardlink.png")]
    images, labels = source.load_all()
    assert images.shape == (21, 3, 32, 32) and np.bincount(labels).tolist() == [10, 11]


def test_exactly_the_visible_images(tmp_path):
    d = _folder(tmp_path / "d", per_class=10)
    (d / "a" / ".ipynb_checkpoints").mkdir()
    for i in range(5):
        _image(d / "a" / ".ipynb_checkpoints" / f"{i:03d}.png", seed=i)
    assert len(open_dataset(f"imagefolder:{d}")) == 20


# --- one dataset, one id ------------------------------------------------------------------------------

def test_canonical_dataset_id_is_one_id_however_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data")
    os.symlink(tmp_path / "data", tmp_path / "alias")
    spellings = ["imagefolder:data", "imagefolder:./data/", f"imagefolder:{tmp_path}/data",
                 "imagefolder:data/../data", "imagefolder:alias"]
    ids = {canonical_dataset_id(s, "train") for s in spellings}
    assert ids == {f"imagefolder:{os.path.realpath(tmp_path / 'data')}"}
    # no train/ or test/ subfolder: both splits read the same records, so they share one id
    assert canonical_dataset_id("imagefolder:data", "test") == canonical_dataset_id("imagefolder:data", "train")
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "test").mkdir()
    assert canonical_dataset_id("imagefolder:split/", "train").endswith("/split/train")
    assert canonical_dataset_id("imagefolder:split", "test").endswith("/split/test")
    assert canonical_dataset_id("fashion-mnist", "train") == "fashion-mnist:train"
    params = ReleaseParams(dataset="imagefolder:./data/", target_epsilon=1.0)
    assert params.resolved_dataset_id == f"imagefolder:{os.path.realpath(tmp_path / 'data')}"
    assert params.model_copy(update={"dataset_id": "mine"}).resolved_dataset_id == "mine"
    # the public release names the folder by a hash only: the custodian's path stays on their machine
    digest = hashlib.sha256(os.path.realpath(tmp_path / "data").encode()).hexdigest()[:16]
    assert params.published_dataset_id == f"imagefolder:sha256-{digest}"
    assert str(tmp_path) not in params.published_dataset_id
    assert params.model_copy(update={"dataset_id": "mine"}).published_dataset_id == "mine"
    assert ReleaseParams(target_epsilon=1.0).published_dataset_id == "fashion-mnist:train"


# --- tool-made copy, thumbnail and trash folders (review finding 3) ---------------------------------

def test_synology_eadir_thumbnails_are_never_records(tmp_path):
    """Before: 8 images with 5 Synology thumbnails each were read as 48 records. Now: 8."""
    d = _folder(tmp_path / "d", per_class=4)
    for img in sorted(d.glob("*/*.png")):
        thumbs = img.parent / "@eaDir" / img.name
        thumbs.mkdir(parents=True)
        for size in ("XL", "B", "M", "S", "SM"):
            Image.open(img).save(thumbs / f"SYNOFILE_THUMB_{size}.jpg")
    (d / "@eaDir" / "a").mkdir(parents=True)  # a top-level one is no class either
    Image.open(d / "a" / "001.png").save(d / "@eaDir" / "a" / "SYNOFILE_THUMB_XL.jpg")
    source = open_dataset(f"imagefolder:{d}")
    assert len(source) == 8 and source.class_names == ("a", "b")
    scan = scan_imagefolder(d)
    assert sorted(p.relative_to(d).as_posix() for p in scan.hidden) == ["@eaDir", "a/@eaDir", "b/@eaDir"]


@pytest.mark.parametrize("where", [
    "$RECYCLE.BIN/S-1-5-21-1004/$RABC123.png",  # Windows recycle bin (and its $R* copy)
    "$RABC123.png",  # a $R* file outside it
    "~$report.png",  # Office temp/lock file
    "~snapshot/001.png",
    "System Volume Information/001.png",
    "lost+found/#12345.png",
    "LOST+FOUND/001.png",  # case-insensitive
    "__macosx/001.png",
    "@Recycle/001.png",  # QNAP
    "#recycle/001.png",  # Synology recycle bin
    ".Trash-1000/files/001.png",
    "sub/@eaDir/001.png/SYNOFILE_THUMB_M.jpg",  # deeper
])
def test_tool_made_copies_are_never_records(tmp_path, where):
    d = _folder(tmp_path / "d", per_class=4)
    copy = d / "a" / where
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes((d / "a" / "001.png").read_bytes())
    (d / "a" / "Thumbs.db").write_bytes(b"x")  # not images: never records either
    (d / "a" / "desktop.ini").write_text("x")
    assert len(open_dataset(f"imagefolder:{d}")) == 8
    assert copy not in scan_imagefolder(d).files


def test_is_hidden_name_is_the_documented_rule():
    from storage.datasets import is_hidden_name

    for name in (".x", "._a.png", "@eaDir", "$RECYCLE.BIN", "$R1.png", "~$doc.png", "~tmp", "__MACOSX",
                 "System Volume Information", "system volume information", "lost+found", "RECYCLER"):
        assert is_hidden_name(name), name
    for name in ("a", "001.png", "cat@home.png", "a$b.png", "a~.png", "lost", "found", "MACOSX", "train"):
        assert not is_hidden_name(name), name


# --- listing errors are never skipped silently (weaker finding) ---------------------------------------

def _unlistable(monkeypatch, token: str) -> None:
    """As if a folder whose path holds `token` were chmod 000 (tests run as root, who may list anything)."""
    real = os.scandir

    def scandir(path="."):
        if token in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_refuses_the_dataset(tmp_path, monkeypatch):
    d = _folder(tmp_path / "d", per_class=4)
    (d / "b" / "scans_zq7tok").mkdir()
    _image(d / "b" / "scans_zq7tok" / "x.png", seed=5)
    assert len(open_dataset(f"imagefolder:{d}")) == 9
    _unlistable(monkeypatch, "zq7tok")
    scan = scan_imagefolder(d)
    assert [(p.relative_to(d).as_posix(), why) for p, why in scan.unreadable] == [
        ("b/scans_zq7tok", "PermissionError: Permission denied")]
    assert len(scan.files) == 8  # what could be listed; the release must not use it
    with pytest.raises(storage.datasets.DatasetCheckError, match="could not be listed or examined"):
        open_dataset(f"imagefolder:{d}")


def test_an_unreadable_class_folder_refuses_the_dataset(tmp_path, monkeypatch):
    d = _folder(tmp_path / "d", per_class=4, classes=("a", "b_zq7tok"))
    _unlistable(monkeypatch, "zq7tok")
    assert [p.name for p, _ in scan_imagefolder(d).unreadable] == ["b_zq7tok"]
    with pytest.raises(storage.datasets.DatasetCheckError):
        open_dataset(f"imagefolder:{d}")


def test_a_listing_that_raises_directly_is_recorded_too(tmp_path, monkeypatch):
    d = _folder(tmp_path / "d", per_class=2)
    real = os.walk

    def walk(top, *args, **kwargs):
        if os.fspath(top).endswith("b"):
            raise PermissionError(13, "Permission denied", os.fspath(top))
        return real(top, *args, **kwargs)

    monkeypatch.setattr(storage.datasets.os, "walk", walk)
    assert [p.name for p, _ in scan_imagefolder(d).unreadable] == ["b"]
    with pytest.raises(storage.datasets.DatasetCheckError):
        open_dataset(f"imagefolder:{d}")


def test_a_path_too_long_is_a_record_that_cannot_be_read(tmp_path):
    """A file whose full path exceeds PATH_MAX (its folders still listable) cannot be examined. It used to
    refuse the dataset: one file's name decided whether a release was made (seventh DP review). It is
    now a record with zero features: against the same folder without it, equal sums, one count more."""
    from tasks.custodian import shard_sums

    d = _folder(tmp_path / "d", per_class=2)
    secret = _too_long_record(d / "b", (d / "a" / "001.png").read_bytes(), "zq7tok")
    scan = scan_imagefolder(d)
    assert scan.unreadable == () and len(secret) > 4096 and "zq7tok" in str(scan.files[-1])
    with pytest.raises(storage.datasets.UnreadableImageError):
        open_dataset(f"imagefolder:{d}").load_all()

    def sums(folder: Path):
        return shard_sums(ReleaseParams(dataset=f"imagefolder:{folder}", target_epsilon=1.0, labelled=True,
                                        batch_size=16, channels=1, cells_per_class=1), 0)

    with_it, without = sums(d), sums(_folder(tmp_path / "e", per_class=2))
    assert np.array_equal(with_it.moment1, without.moment1)
    assert (with_it.counts - without.counts).tolist() == [0.0, 1.0]


def _too_long_record(folder: Path, data: bytes, token: str) -> str:
    """Write `data` to a file under `folder` whose full path is longer than PATH_MAX (4,096 with its NUL)
    while its folder's path (3,870 to 3,880 characters) is not, whatever the length of `folder`: the folder can
    be listed, the file cannot be examined by path. Returns that path."""
    fd = os.open(folder, os.O_RDONLY)
    path = str(folder)
    try:
        while len(path) < 3870:
            name = "d" * min(200, 3880 - len(path) - 1)
            os.mkdir(name, dir_fd=fd)
            new = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, path = new, path + "/" + name
        name = f"{token}_" + "x" * (250 - len(token) - 5) + ".png"  # >= 3,870 + 1 + 250 > 4,096
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)
    return path + "/" + name
