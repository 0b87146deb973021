"""`spurfast make-pool`: deterministic procedural JPEG pools whose ground truth matches
the folder source's order, with the planted pattern where the loader puts it."""
import csv
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from spurfast.cli import main
from spurfast.data.folder import ImageFolderSource
from spurfast.make_pool import PoolSpec, make_pool, parse_size, read_ground_truth


def test_pool_layout_ground_truth_and_determinism(tmp_path):
    spec = PoolSpec(n=60, classes=5, min_size=40, max_size=90, plant="patch5", fraction=0.5, target_size=32, seed=3)
    info = make_pool(tmp_path / "a", spec, workers=1, progress=False)
    assert info["n"] == 60 and info["n_carrying"] == 30
    src = ImageFolderSource(tmp_path / "a", size=32)
    labels, carries = read_ground_truth(tmp_path / "a")
    assert len(src) == 60 and src.class_names == [f"c{c:04d}" for c in range(5)]
    np.testing.assert_array_equal(src.labels(), labels)
    rows = list(csv.DictReader(open(tmp_path / "a" / "ground_truth.csv")))
    assert [r["path"] for r in rows] == [str(__import__("os").path.relpath(p, tmp_path / "a")) for p in src.paths]
    sizes = {__import__("PIL.Image", fromlist=["Image"]).open(p).size for p in src.paths}
    assert len(sizes) > 10 and all(40 <= min(s) and max(s) <= 90 for s in sizes)
    # the white 5x5 patch sits at the bottom-right of the loaded 32x32 image of every carrier
    x, _ = src.get_batch(np.arange(60))
    corner = x[:, :, 26:31, 26:31].mean((1, 2, 3))
    assert float(corner[torch.as_tensor(carries)].min()) > 0.8
    assert float(corner[~torch.as_tensor(carries)].mean()) < 0.7
    # same seed, other worker count: byte-identical files
    make_pool(tmp_path / "b", spec, workers=2, progress=False)
    for p in src.paths[::7]:
        q = p.replace(str(tmp_path / "a"), str(tmp_path / "b"))
        assert open(p, "rb").read() == open(q, "rb").read()
    # the same command again: the pool is complete, nothing is written (it was refused as "not empty",
    # where an interrupted one resumed); other settings are still refused
    before = {p: os.stat(p).st_mtime_ns for p in src.paths[::7]}
    again = make_pool(tmp_path / "a", spec, progress=False)
    assert again["already_complete"] and again["n"] == spec.n
    assert {p: os.stat(p).st_mtime_ns for p in src.paths[::7]} == before
    with pytest.raises(FileExistsError, match="not empty"):
        make_pool(tmp_path / "a", replace(spec, seed=spec.seed + 1), progress=False)
    # its ground truth deleted: the same command writes it again (it was refused as "a make-pool
    # pool of other settings"); no image is redrawn
    truth = (tmp_path / "a" / "ground_truth.csv").read_bytes()
    (tmp_path / "a" / "ground_truth.csv").unlink()
    again = make_pool(tmp_path / "a", spec, progress=False)
    assert (tmp_path / "a" / "ground_truth.csv").read_bytes() == truth and again["resumed_with"] == spec.n
    assert {p: os.stat(p).st_mtime_ns for p in src.paths[::7]} == before


def test_plant_class_and_flat_layout(tmp_path):
    spec = PoolSpec(n=30, classes=3, min_size=32, max_size=48, flat=True, plant="bar", fraction=1.0, plant_class=2,
                    target_size=32)
    make_pool(tmp_path / "f", spec, workers=1, progress=False)
    labels, carries = read_ground_truth(tmp_path / "f")
    assert ImageFolderSource(tmp_path / "f", size=32).class_names is None
    assert carries.sum() == 10 and (labels[carries] == 2).all()


@pytest.mark.parametrize("kw, msg", [
    (dict(n=0), "--n must be"), (dict(n=5, classes=0), "--classes"), (dict(n=5, min_size=50, max_size=40), "sizes"),
    (dict(n=5, plant="background", fraction=0.1), "unknown plant family"),
    (dict(n=5, plant="patch3", fraction=0.0), "--fraction must be"),
    (dict(n=5, fraction=0.2), "needs --plant"), (dict(n=5, classes=3, plant="patch3", fraction=0.2, plant_class=3), "--plant-class"),
    (dict(n=5, plant="pixel", fraction=0.2, min_size=48, target_size=64), "at least as large as --target-size 64"),
    (dict(n=5, seed=-1), "--seed must be >= 0, got -1"),
    (dict(n=5, plant="patch3", fraction=0.4, pattern_seed=2 ** 64 - 1),
     r"pattern seed must be in \[0, 2\*\*64 - 7919\)"),
])
def test_bad_specs_are_refused(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        make_pool(tmp_path / "p", PoolSpec(**kw), progress=False)
    assert not (tmp_path / "p").exists()


def test_cli(tmp_path, capsys):
    assert parse_size("64") == (64, 64) and parse_size("48:96") == (48, 96)
    code = main(["make-pool", "--out", str(tmp_path / "c"), "--n", "12", "--classes", "3", "--size", "32:40",
                 "--plant", "noise", "--fraction", "0.25", "--target-size", "32", "--quiet", "--workers", "1"])
    assert code == 0 and "wrote 12 images (3 carry noise)" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "pool.json").read_text())["spec"]["plant"] == "noise"
    assert main(["make-pool", "--out", str(tmp_path / "d"), "--n", "5", "--size", "a:b"]) == 2
    assert "--size must be" in capsys.readouterr().err


def test_planted_pixels_land_where_the_loader_reads_them(tmp_path):
    """Each pattern pixel is painted over the source area the loader's resize maps to its
    output pixel (crop_geometry: long side rounded, crop offset in resized pixels)."""
    from spurfast.data.preprocess import PreprocessSpec, load_image_uint8
    from spurfast.make_pool import _plan, pattern_overlay, plant_image, render

    # losslessly (PNG): the centre of a 3x3 patch reads its planted value exactly, since the
    # loader's antialiasing filter for that pixel reaches only into the patch's own footprints
    spec = PoolSpec(n=60, classes=3, min_size=32, max_size=150, plant="patch3", fraction=1.0, target_size=32, seed=5)
    values, mask = pattern_overlay(spec)
    r, c = [int(a.mean()) for a in np.nonzero(mask)]
    labels, _ = _plan(spec)
    centre = []
    for i in range(spec.n):
        plant_image(render(i, int(labels[i]), spec), values, mask, additive=False).save(tmp_path / "x.png")
        centre.append(load_image_uint8(str(tmp_path / "x.png"), PreprocessSpec(32))[:, r, c].min().item())
    assert min(centre) >= 254, sorted(centre)[:5]
    # through make-pool's JPEGs: a lone planted white pixel stands out in every carrier
    spec = PoolSpec(n=80, classes=4, min_size=40, max_size=120, plant="pixel", fraction=0.5, target_size=32, seed=1)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    _, carries = read_ground_truth(tmp_path / "p")
    (r, c), = zip(*np.nonzero(pattern_overlay(spec)[1]))
    x, _ = ImageFolderSource(tmp_path / "p", size=32).get_batch(np.arange(spec.n))
    px = x[:, :, r, c].mean(1).numpy()
    assert px[carries].min() > 0.6, np.sort(px[carries])[:5]


def test_overwrite_deletes_only_a_pool_make_pool_wrote(tmp_path):
    spec = PoolSpec(n=4, classes=2, min_size=16, max_size=16)
    foreign = tmp_path / "my_photos"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="my_photos is not empty and was not written by make-pool") as e:
        make_pool(foreign, spec, workers=1, progress=False, overwrite=True)
    assert "pass --overwrite" not in str(e.value)  # the refusal must not suggest the flag that deletes
    (foreign / "pool.json").write_text(json.dumps({"spec": "someone else's"}))  # not make-pool's pool.json
    with pytest.raises(FileExistsError, match="not written by make-pool"):
        make_pool(foreign, spec, workers=1, progress=False, overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["pool.json", "thesis.tex"]
    # make-pool's own pool (finished, cut off mid-write, or from before the marker) is replaced
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert json.loads((tmp_path / "p" / "pool.json").read_text())["writer"] == "spurfast make-pool"
    make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    (tmp_path / "p" / "ground_truth.csv").unlink()
    (tmp_path / "p" / "pool.json").write_text(json.dumps({"writer": "spurfast make-pool", "spec": None}))
    make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    (tmp_path / "p" / "pool.json").write_text(json.dumps({k: info[k] for k in ("spec", "n", "n_carrying", "classes")}))
    make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    assert len(ImageFolderSource(tmp_path / "p", size=16)) == 4


def test_class_folders_sort_in_label_order_past_10000_classes(tmp_path):
    """The folder source labels classes by sorted folder name: c10000 must sort after c1001."""
    from PIL import Image

    from spurfast.data.folder import list_folder
    from spurfast.make_pool import _relpath

    spec = PoolSpec(n=10002, classes=10001)
    for label in (10000, 1001, 999, 1000):
        p = tmp_path / "p" / _relpath(label, label, spec)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p)
    _, _, names = list_folder(tmp_path / "p")
    assert [int(n[1:]) for n in names] == [999, 1000, 1001, 10000], names
    # make-pool's own folders take the same width, and up to 10,000 classes keep c0000
    make_pool(tmp_path / "q", PoolSpec(n=3, classes=10001, min_size=8, max_size=8), workers=1, progress=False)
    assert ImageFolderSource(tmp_path / "q", size=8).class_names == ["c00000", "c00001", "c00002"]
    np.testing.assert_array_equal(read_ground_truth(tmp_path / "q")[0], [0, 1, 2])
    assert _relpath(7, 9999, PoolSpec(n=1, classes=10000)) == "c9999/00000007.jpg"


@pytest.mark.parametrize("family", ["pixel", "patch3", "patch5", "bar"])
def test_grey_strength_is_refused_for_painted_patterns(tmp_path, family):
    """A painted grey can equal the background, so a listed carrier could show nothing."""
    with pytest.raises(ValueError, match=rf"--strength 0.5 is for --plant noise only.*--plant {family}"):
        make_pool(tmp_path / "p", PoolSpec(n=5, plant=family, fraction=0.2, strength=0.5), progress=False)
    assert not (tmp_path / "p").exists()
    PoolSpec(n=5, plant=family, fraction=0.2, strength=1.0).validate()
    PoolSpec(n=5, plant="noise", fraction=0.2, strength=0.5).validate()   # noise: strength is its amplitude


@pytest.mark.parametrize("kw, msg", [
    (dict(n=5, classes=10, plant_class=7), r"--fraction 0.5 of the 0 image\(s\) of --plant-class 7 among --n 5 rounds "
                                           r"to no carrier"),
    (dict(n=5, classes=2, fraction=0.05), r"--fraction 0.05 of the 5 image\(s\) among --n 5 rounds to no carrier"),
])
def test_a_planted_pool_without_a_carrier_is_refused(tmp_path, kw, msg):
    """Planting into a class with no images, or a fraction that rounds to none, wrote a pool
    whose ground truth lists no carrier while pool.json names the pattern."""
    spec = PoolSpec(**{"min_size": 16, "max_size": 16, "plant": "patch3", "fraction": 0.5, "target_size": 16, **kw})
    with pytest.raises(ValueError, match=msg):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert not (tmp_path / "p").exists()
    info = make_pool(tmp_path / "q", PoolSpec(n=6, classes=3, min_size=16, max_size=16, plant="patch3", fraction=0.5,
                                              plant_class=2, target_size=16), workers=1, progress=False)
    assert info["n_carrying"] == 1   # class 2 holds images 2 and 5: one carrier


@pytest.mark.parametrize("kw, msg", [
    (dict(n=6, classes=3, plant_class=1), r"--plant-class 1 needs --plant FAMILY"),
    (dict(n=6, target_size=-5), r"--target-size -5 needs --plant FAMILY"),
    (dict(n=6, strength=0.5), r"--strength 0\.5 needs --plant noise"),
])
def test_planting_options_without_a_family_are_refused(tmp_path, kw, msg):
    """--fraction without --plant was refused, but --plant-class and --strength were
    ignored: the pool came out unplanted ("0 carry no pattern") with no word."""
    with pytest.raises(ValueError, match=msg):
        make_pool(tmp_path / "p", PoolSpec(**kw), progress=False)
    assert not (tmp_path / "p").exists()


def test_overwrite_through_a_link_to_the_pool(tmp_path):
    """--out a link to a make-pool folder with --overwrite: rmtree refused the link
    ("Cannot call rmtree on a symbolic link", a traceback naming no path)."""
    spec = PoolSpec(n=4, classes=2, min_size=16, max_size=16)
    make_pool(tmp_path / "real", spec, workers=1, progress=False)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    info = make_pool(tmp_path / "link", PoolSpec(n=6, classes=2, min_size=16, max_size=16), workers=1,
                     progress=False, overwrite=True)
    assert info["n"] == 6 and (tmp_path / "link").is_symlink()
    assert len(ImageFolderSource(tmp_path / "link", size=16)) == 6
    assert read_ground_truth(tmp_path / "real")[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_worker_count_does_not_change_the_pool(tmp_path):
    """Image i depends only on (seed, i).  The layout test compares workers=1 and 2 on 60
    images, which make-pool writes in-process (one chunk of 256): its worker processes
    were never run by a test."""
    import filecmp

    spec = PoolSpec(n=300, classes=3, min_size=16, max_size=24, plant="noise", strength=0.5, fraction=0.1,
                    target_size=16, seed=5)
    make_pool(tmp_path / "one", spec, workers=1, progress=False)
    make_pool(tmp_path / "two", spec, workers=2, progress=False)
    rel = [p.relative_to(tmp_path / "one") for p in sorted((tmp_path / "one").rglob("*.jpg"))]
    assert len(rel) == 300
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "one", tmp_path / "two", [str(r) for r in rel], shallow=False)
    assert not mismatch and not errors, (mismatch[:5], errors[:5])
    assert (tmp_path / "one" / "ground_truth.csv").read_bytes() == (tmp_path / "two" / "ground_truth.csv").read_bytes()


def test_overwrite_of_the_current_directory(tmp_path, monkeypatch):
    """--out . --overwrite inside a make-pool folder: rmtree(".") deleted the whole pool,
    then failed on rmdir(".") (OSError: [Errno 22] Invalid argument: '.'), leaving nothing."""
    spec = PoolSpec(n=4, classes=2, min_size=16, max_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.chdir(tmp_path / "p")
    info = make_pool(".", PoolSpec(n=6, classes=3, min_size=16, max_size=16), workers=1, progress=False,
                     overwrite=True)
    assert info["n"] == 6
    assert read_ground_truth(tmp_path / "p")[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(ImageFolderSource(tmp_path / "p", size=16)) == 6


def test_an_overwrite_cut_short_can_be_overwritten_again(tmp_path, monkeypatch):
    """Ctrl-C while --overwrite deletes the old pool: rmtree could delete pool.json (the
    marker that lets --overwrite delete the folder) before the images, and the rerun was
    then refused ("not written by make-pool"), the half-deleted pool left to delete by hand."""
    import os

    spec = PoolSpec(n=6, classes=3, min_size=16, max_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    real = os.unlink

    def unlink(path, *args, **kwargs):   # Ctrl-C just after the marker goes
        real(path, *args, **kwargs)
        if os.fsdecode(path).endswith("pool.json"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    monkeypatch.setattr(os, "unlink", real)
    make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    assert len(ImageFolderSource(tmp_path / "p", size=16)) == 6


def test_out_below_a_file_or_a_dangling_link_is_named(tmp_path, capsys):
    """--out below a file failed at mkdir with a bare "[Errno 20] Not a directory: 'f/x'",
    and one through a dangling link with "[Errno 17] File exists", naming neither culprit."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    assert main(["make-pool", "--out", str(tmp_path / "f" / "x" / "y"), "--n", "5", "--quiet"]) == 2
    assert f"{tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err
    for out in (tmp_path / "gone", tmp_path / "gone" / "x"):
        assert main(["make-pool", "--out", str(out), "--n", "5", "--quiet"]) == 2
        assert f"{tmp_path / 'gone'} is a link to" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def _failing_pool_json_writes(monkeypatch, when: str, exc: BaseException):
    """Make the write of a pool.json whose text holds ``when`` stop halfway with ``exc``."""
    import builtins

    import spurfast.atomic_files as af

    class HalfWriter:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            if when in text:
                self.fh.write(text[:len(text) // 2])
                raise exc
            return self.fh.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return self.fh.__exit__(*exc_info)

        def __getattr__(self, name):   # flush, fileno: the file's own
            return getattr(self.fh, name)

    def open_(path, *args, **kwargs):
        fh = builtins.open(path, *args, **kwargs)
        return HalfWriter(fh) if Path(path).name.startswith("pool.json.") else fh

    monkeypatch.setattr(af, "open", open_, raising=False)


def test_a_pool_json_write_cut_short_can_be_overwritten(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while the finished pool's pool.json was written left it
    truncated: no longer the marker, so every rerun, --overwrite included, was refused."""
    spec = PoolSpec(n=6, classes=3, min_size=16, max_size=16)
    _failing_pool_json_writes(monkeypatch, '"n_carrying"', KeyboardInterrupt())   # the final pool.json
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.undo()
    assert json.loads((tmp_path / "p" / "pool.json").read_text())["spec"] is None   # the marker, whole
    info = make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    assert json.loads((tmp_path / "p" / "pool.json").read_text()) == info
    assert sorted(p.name for p in (tmp_path / "p").iterdir() if p.is_file()) == ["ground_truth.csv", "pool.json"]


def test_a_first_marker_write_that_fails_leaves_the_folder_reusable(tmp_path, monkeypatch):
    """A full disk at make-pool's first pool.json write (the "unfinished" marker) left an
    empty pool.json: the folder was then refused on every rerun, --overwrite included,
    even once space was freed."""
    import errno

    spec = PoolSpec(n=4, classes=2, min_size=16, max_size=16)
    _failing_pool_json_writes(monkeypatch, '"spec": null', OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.undo()
    assert list((tmp_path / "p").iterdir()) == []
    info = make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert json.loads((tmp_path / "p" / "pool.json").read_text()) == info


def test_an_interrupted_pool_is_refused_as_a_source_until_finished(tmp_path, monkeypatch):
    """A make-pool cut short mid-write left 300 of 600 images (classes 0-4 only, in one
    chunk order) and discover or train read that folder as the whole pool, silently."""
    import spurfast.make_pool as mp_mod

    real = mp_mod.render

    def render_then_stop(i, label, spec):
        if i == 300:
            raise KeyboardInterrupt
        return real(i, label, spec)

    spec = PoolSpec(n=600, classes=4, min_size=8, max_size=8)
    monkeypatch.setattr(mp_mod, "render", render_then_stop)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.setattr(mp_mod, "render", real)
    with pytest.raises(ValueError, match=f"pool {tmp_path / 'p'} is incomplete .*rerun the same make-pool"):
        ImageFolderSource(tmp_path / "p", size=8)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert len(ImageFolderSource(tmp_path / "p", size=8)) == 600


def test_the_ground_truth_of_an_interrupted_pool_is_refused(tmp_path, monkeypatch):
    """A make-pool cut short while ground_truth.csv was written left fewer rows than
    images, and read_ground_truth returned them as the pool's whole ground truth."""
    import csv as _csv

    import spurfast.make_pool as mp_mod

    real = _csv.writer

    class CutWriter:   # Ctrl-C after the header and two rows
        def __init__(self, fh):
            self.w, self.rows = real(fh), 0

        def writerow(self, row):
            if self.rows == 3:
                raise KeyboardInterrupt
            self.rows += 1
            return self.w.writerow(row)

    monkeypatch.setattr(mp_mod.csv, "writer", CutWriter)
    spec = PoolSpec(n=6, classes=2, min_size=16, max_size=16)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.setattr(mp_mod.csv, "writer", real)
    with pytest.raises(ValueError, match="is incomplete .*--overwrite"):
        read_ground_truth(tmp_path / "p")
    make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)
    assert len(read_ground_truth(tmp_path / "p")[0]) == 6
    # a ground_truth.csv that lost rows after the fact is named too
    gt = tmp_path / "p" / "ground_truth.csv"
    gt.write_text("".join(gt.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(ValueError, match="has 3 rows, but .*pool.json says the pool holds 6 images"):
        read_ground_truth(tmp_path / "p")


def test_pool_json_lists_the_classes_the_pool_holds_not_every_class(tmp_path):
    """pool.json listed one entry per --classes whatever --n: a 4-image pool of
    --classes 1000000 took 1.7 GB and 25 s, and --classes 10**7 would not fit in memory."""
    info = make_pool(tmp_path / "p", PoolSpec(n=3, classes=10**5, min_size=16, max_size=16), workers=1,
                     progress=False)
    assert [c["label"] for c in info["classes"]] == [0, 1, 2]
    assert read_ground_truth(tmp_path / "p")[0].tolist() == [0, 1, 2]
    # every class of a pool with more images than classes is still listed
    info = make_pool(tmp_path / "q", PoolSpec(n=5, classes=2, min_size=16, max_size=16), workers=1, progress=False)
    assert [c["label"] for c in info["classes"]] == [0, 1]


def test_sizes_past_the_largest_jpeg_are_refused_before_anything_is_written(tmp_path):
    """--size 8:2**63 made the folder and failed at the first image with numpy's "high is
    out of bounds for int64", naming no option; a side past 65,500 cannot be a JPEG at all
    (a 65,501 px image took 51 GB to render before its save failed)."""
    with pytest.raises(ValueError, match=r"at most 65,500 .* --size 8:9223372036854775808"):
        make_pool(tmp_path / "p", PoolSpec(n=1, min_size=8, max_size=2**63), workers=1, progress=False)
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match=r"at most 65,500"):
        PoolSpec(n=1, min_size=65501, max_size=65501).validate()


def test_a_pool_too_large_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    # --n 10000000000 (a slip of zeros) failed in numpy's allocator, a traceback, after the folder
    # and its marker were made; the marker then refused the intended --n as another run's
    import spurfast.make_pool as M
    from spurfast.cli import main

    assert main(["make-pool", "--out", str(tmp_path / "p"), "--n", "10000000000"]) == 2
    assert "--n must be at most 100,000,000 images, got 10,000,000,000" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

    def no_memory(spec):
        raise MemoryError

    monkeypatch.setattr(M, "_plan", no_memory)
    with pytest.raises(ValueError, match=r"--n 1,000: the plan of the pool .* does not fit in memory"):
        make_pool(tmp_path / "p", PoolSpec(n=1000), workers=1, progress=False)
    assert not (tmp_path / "p").exists()


def test_sizes_past_pils_pixel_limit_are_refused(monkeypatch):
    """Images past PIL's decompression-bomb limit (2 x MAX_IMAGE_PIXELS) are marked bad by both
    loaders: such a pool would be written in full and then embedded as nothing."""
    from PIL import Image
    side = math.isqrt(2 * Image.MAX_IMAGE_PIXELS)
    PoolSpec(n=1, min_size=64, max_size=side).validate()
    with pytest.raises(ValueError, match=rf"PIL's limit .* at most {side:,} per side"):
        PoolSpec(n=1, min_size=64, max_size=side + 1).validate()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)      # the user lifted the limit
    PoolSpec(n=1, min_size=65500, max_size=65500).validate()


def test_a_numpy_int32_size_past_the_limit_is_refused_too(tmp_path, monkeypatch):
    """An int32 max_size squared wrapped negative and passed the pixel-limit check: the pool was
    written with images both loaders refuse (numpy numbers are converted before the checks now)."""
    import spurfast.make_pool as M

    monkeypatch.setattr(M, "render", lambda *a: pytest.fail("a 60,000-pixel image was drawn"))
    with pytest.raises(ValueError, match=r"PIL's limit"):
        make_pool(tmp_path / "p", PoolSpec(n=1, min_size=8, max_size=np.int32(60000)), workers=1, progress=False)
    assert not (tmp_path / "p").exists()


def test_a_folder_left_with_only_a_half_written_first_marker_is_written(tmp_path):
    """A run killed (SIGKILL) while it wrote the first pool.json left only its temporary file,
    and every rerun, --overwrite too, refused the folder as not make-pool's."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()   # a pid whose process has ended
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / f"pool.json.{gone}.tmp").write_text('{"writer": "spurfast make-pool", "sp')
    info = make_pool(tmp_path / "p", PoolSpec(n=3, min_size=16, max_size=16), workers=1, progress=False)
    assert info["n"] == 3 and not list((tmp_path / "p").glob("pool.json.*"))
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / f"pool.json.{gone}.tmp").write_text("")
    (tmp_path / "q" / "photo.jpg").write_text("a user's")   # not only the marker: still refused
    with pytest.raises(FileExistsError, match="not written by make-pool"):
        make_pool(tmp_path / "q", PoolSpec(n=3, min_size=16, max_size=16), workers=1, progress=False, overwrite=True)
    # one a live process is writing (a make-pool started on the same folder) is not taken
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / f"pool.json.{os.getppid()}.tmp").write_text("")
    with pytest.raises(FileExistsError, match="not written by make-pool"):
        make_pool(tmp_path / "r", PoolSpec(n=3, min_size=16, max_size=16), workers=1, progress=False)


def test_a_resumed_pool_drops_the_marker_a_killed_run_was_writing(tmp_path):
    """Resuming removes the temporary pool.json of the killed run (named by its pid now, so
    the next write no longer replaces it)."""
    import subprocess
    import sys

    spec = PoolSpec(n=5, min_size=16, max_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    (tmp_path / "p" / "pool.json").write_text(json.dumps({"writer": info["writer"], "spec": None,
                                                           "writing": info["spec"]}))   # as if cut short
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / "p" / f"pool.json.{gone}.tmp").write_text('{"writer"')
    again = make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert again["resumed_with"] == 5 and not list((tmp_path / "p").glob("pool.json.*"))


def test_classes_past_int64_label_the_pool_as_fewer_classes_do(tmp_path):
    """--classes 2**63 on 3 images raised OverflowError (a traceback) after the folder was
    made; each image's label is its index whenever --n <= --classes."""
    info = make_pool(tmp_path / "p", PoolSpec(n=3, classes=2**63, min_size=16, max_size=16), workers=1,
                     progress=False)
    assert [c["label"] for c in info["classes"]] == [0, 1, 2] and info["spec"]["classes"] == 2**63
    assert read_ground_truth(tmp_path / "p")[0].tolist() == [0, 1, 2]
    assert len(ImageFolderSource(tmp_path / "p", size=16).class_names) == 3


def test_an_overwrite_cut_short_leaves_the_pool_marked_unfinished(tmp_path, monkeypatch):
    """Ctrl-C while --overwrite deleted the old pool (say, on seeing the wrong --out) left its
    pool.json, which says the pool is whole, and its ground truth over part of its images:
    read_ground_truth then returned all 6 rows for a folder of 4 images."""
    import shutil
    from pathlib import Path

    spec = PoolSpec(n=6, classes=3, min_size=16, max_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    real_iterdir, real_rmtree = Path.iterdir, shutil.rmtree
    # class folders first, ground_truth.csv after them (iterdir's order is the file system's)
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(sorted(real_iterdir(self))))
    calls = []

    def rmtree(path, *args, **kwargs):   # Ctrl-C after the first class folder went
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", PoolSpec(n=9, classes=3, min_size=16, max_size=16), workers=1, progress=False,
                  overwrite=True)
    monkeypatch.undo()
    from spurfast.data.folder import list_folder
    assert len(list_folder(tmp_path / "p")[0]) == 4
    assert json.loads((tmp_path / "p" / "pool.json").read_text())["spec"] is None
    with pytest.raises(ValueError, match="is incomplete"):   # nor is it taken as a pool
        ImageFolderSource(tmp_path / "p", size=16)
    with pytest.raises((ValueError, FileNotFoundError), match="is incomplete|has no ground_truth.csv"):
        read_ground_truth(tmp_path / "p")
    make_pool(tmp_path / "p", spec, workers=1, progress=False, overwrite=True)   # and it can be overwritten
    assert len(read_ground_truth(tmp_path / "p")[0]) == 6


def test_a_spec_of_numpy_numbers_writes_its_pool_json(tmp_path):
    """PoolSpec(n=np.int64(6), ...) (a count taken from an array) wrote every image, then
    failed at the final pool.json ("Object of type int64 is not JSON serializable"), leaving
    the pool marked unfinished: its ground truth refused, the work to redo with --overwrite;
    a numpy quality failed at the first image ("Invalid quality setting", from PIL)."""
    spec = PoolSpec(n=np.int64(6), classes=np.int64(3), min_size=np.int64(16), max_size=np.int32(16), flat=np.bool_(0),
                    plant="noise", fraction=np.float32(0.5), strength=np.float32(0.5), target_size=np.int64(16),
                    quality=np.int16(90), seed=np.uint8(2))
    info = make_pool(tmp_path / "p", spec, workers=1, progress=False)
    same = PoolSpec(n=6, classes=3, min_size=16, max_size=16, plant="noise", fraction=0.5, strength=0.5,
                    target_size=16, seed=2)
    assert json.loads((tmp_path / "p" / "pool.json").read_text())["spec"] == info["spec"] == same.__dict__
    assert info["n"] == 6 and type(info["n"]) is int and info["n_carrying"] == 3
    ref = make_pool(tmp_path / "q", same, workers=1, progress=False)
    assert read_ground_truth(tmp_path / "p")[1].tolist() == read_ground_truth(tmp_path / "q")[1].tolist()
    assert ref["classes"] == info["classes"]


def test_an_overwrite_on_a_full_disk_frees_space_before_it_writes(tmp_path, monkeypatch):
    """--overwrite marks pool.json unfinished before deleting the old pool: on a disk the old
    pool filled, the ground truth's space is freed first, so the marker can be written."""
    from pathlib import Path

    spec = PoolSpec(n=6, classes=3, min_size=16, max_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    real, freed = Path.write_text, []

    def write_text(self, data, *args, **kwargs):   # no space until the old ground truth is gone
        if not freed and (tmp_path / "p" / "ground_truth.csv").exists():
            raise OSError(28, "No space left on device", str(self))
        freed.append(True)
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    info = make_pool(tmp_path / "p", PoolSpec(n=3, classes=3, min_size=16, max_size=16), workers=1, progress=False,
                     overwrite=True)
    assert info["n"] == 3 and len(read_ground_truth(tmp_path / "p")[0]) == 3
    # a make-pool the full disk cut short (pool.json unfinished, no ground truth) is overwritten
    # with no write before the old images are gone
    monkeypatch.undo()
    make_pool(tmp_path / "q", spec, workers=1, progress=False)
    (tmp_path / "q" / "ground_truth.csv").unlink()
    (tmp_path / "q" / "pool.json").write_text(json.dumps({"writer": "spurfast make-pool", "spec": None}))

    gone = []

    def full(self, data, *args, **kwargs):   # no space until the old images are gone
        if not gone and (tmp_path / "q" / "c0000").exists():
            raise OSError(28, "No space left on device", str(self))
        gone.append(True)
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert make_pool(tmp_path / "q", spec, workers=1, progress=False, overwrite=True)["n"] == 6


def _interrupt_render_after(monkeypatch, calls: int):
    """make-pool's render raises KeyboardInterrupt (Ctrl-C) once it has drawn ``calls`` images;
    returns the list of image indices rendered."""
    import spurfast.make_pool as M

    real, drawn = M.render, []

    def render(i, label, spec):
        if len(drawn) == calls:
            raise KeyboardInterrupt
        drawn.append(i)
        return real(i, label, spec)

    monkeypatch.setattr(M, "render", render)
    return drawn


def test_an_interrupted_pool_resumes_to_the_same_pool(tmp_path, monkeypatch):
    """A make-pool cut short kept nothing: the same command refused the folder, and --overwrite
    rendered every image again (a 100k-image pool takes minutes).  Now the same command keeps the
    images written and draws only the rest; the pool equals one written without a break."""
    import filecmp

    spec = PoolSpec(n=20, classes=3, min_size=16, max_size=24, plant="patch3", fraction=0.3, target_size=16, seed=3)
    make_pool(tmp_path / "whole", spec, workers=1, progress=False)
    _interrupt_render_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "cut", spec, workers=1, progress=False)
    assert len(list((tmp_path / "cut").rglob("*.jpg"))) == 7 and not (tmp_path / "cut" / "ground_truth.csv").exists()
    monkeypatch.undo()
    drawn = _interrupt_render_after(monkeypatch, 10 ** 9)   # counts only
    info = make_pool(tmp_path / "cut", spec, workers=1, progress=False)
    assert len(drawn) == 13 and info["resumed_with"] == 7
    rel = [str(p.relative_to(tmp_path / "whole")) for p in sorted((tmp_path / "whole").rglob("*.jpg"))]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "whole", tmp_path / "cut", rel, shallow=False)
    assert len(match) == 20 and not mismatch and not errors
    assert (tmp_path / "whole" / "ground_truth.csv").read_bytes() == (tmp_path / "cut" / "ground_truth.csv").read_bytes()
    assert json.loads((tmp_path / "cut" / "pool.json").read_text())["spec"] == json.loads(
        (tmp_path / "whole" / "pool.json").read_text())["spec"]
    assert make_pool(tmp_path / "cut", spec, workers=1, progress=False)["already_complete"]   # not rewritten
    # a finished pool of other settings: said so (it was "not empty" and no more)
    with pytest.raises(FileExistsError, match=r"is not empty \(a make-pool pool of other settings\); choose another "
                                              r"or pass --overwrite"):
        make_pool(tmp_path / "cut", replace(spec, quality=spec.quality - 1), workers=1, progress=False)


def test_an_image_cut_short_mid_save_is_never_kept(tmp_path, monkeypatch):
    """Images were saved in place: a run killed mid-save left a truncated JPEG under its final
    name, which a resume would have kept.  They are written to a temporary name and renamed; a
    temporary file a killed writer left behind is removed on resuming."""
    from PIL import Image

    spec = PoolSpec(n=8, classes=2, min_size=16, max_size=16)
    real_save, saved = Image.Image.save, []

    def save(self, fp, *args, **kwargs):   # Ctrl-C halfway through the fourth image's bytes
        if len(saved) == 3:
            fp.write(b"\xff\xd8\xff")   # the open temporary file make-pool hands to PIL
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.undo()
    files = sorted(p.name for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert files == ["00000000.jpg", "00000001.jpg", "00000002.jpg", "pool.json"], files
    stale = tmp_path / "p" / "c0001" / "00000005.jpg.4242.tmp"   # as a SIGKILLed writer leaves it
    stale.write_bytes(b"\xff\xd8")
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert not stale.exists()
    src = ImageFolderSource(tmp_path / "p", size=16)
    assert len(src) == 8 and all(src.load(i)[1] for i in range(8)) and not src.bad_files   # every image whole


def test_an_interrupted_pool_of_other_settings_is_not_resumed(tmp_path, monkeypatch):
    spec = PoolSpec(n=12, classes=2, min_size=16, max_size=16)
    _interrupt_render_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="interrupted make-pool of other settings.*--overwrite"):
        make_pool(tmp_path / "p", PoolSpec(n=12, classes=2, min_size=16, max_size=16, seed=1), workers=1,
                  progress=False)
    info = make_pool(tmp_path / "p", PoolSpec(n=12, classes=2, min_size=16, max_size=16, seed=1), workers=1,
                     progress=False, overwrite=True)
    assert info["resumed_with"] == 0 and len(read_ground_truth(tmp_path / "p")[0]) == 12


def test_the_same_make_pool_command_on_its_finished_pool_writes_nothing(tmp_path, capsys):
    args = ["make-pool", "--out", str(tmp_path / "p"), "--n", "12", "--size", "32", "--classes", "2", "--quiet",
            "--workers", "1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'p'} already holds this pool (12 images, no pattern planted): nothing "
                          f"written"), out


def _interrupted_with_a_stray(tmp_path, monkeypatch, name: str):
    """(spec, path): a 12-image pool under tmp_path/p cut after 4 images, with a copy of its first
    image as c0000/``name``."""
    spec = PoolSpec(n=12, classes=2, min_size=16, max_size=16)
    _interrupt_render_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    monkeypatch.undo()
    stray = tmp_path / "p" / "c0000" / name
    stray.write_bytes((tmp_path / "p" / "c0000" / "00000000.jpg").read_bytes())
    return spec, stray


def test_a_stray_file_in_an_interrupted_pool_is_refused_before_any_image_is_written(tmp_path, monkeypatch,
                                                                                   capsys):
    """A file make-pool did not write (c0000/extra.jpg) in an interrupted pool: the rerun wrote every
    remaining image, then raised RuntimeError (a traceback) while it wrote ground_truth.csv, which it
    left cut short.  Now it is refused before any image is drawn, naming the file and the remedy."""
    spec, stray = _interrupted_with_a_stray(tmp_path, monkeypatch, "extra.jpg")
    drawn = _interrupt_render_after(monkeypatch, 10 ** 9)   # counts only
    capsys.readouterr()
    code = main(["make-pool", "--out", str(tmp_path / "p"), "--n", "12", "--classes", "2", "--size", "16",
                 "--quiet", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(stray) in err and "remove it" in err and "--overwrite" in err, err
    assert drawn == [] and not (tmp_path / "p" / "ground_truth.csv").exists()
    # an extra folder in a class-folder pool reads as a class of its own: refused too
    stray.unlink()
    (tmp_path / "p" / "notes").mkdir()
    with pytest.raises(ValueError, match=r"notes.*make-pool did not write"):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert drawn == []
    (tmp_path / "p" / "notes").rmdir()
    info = make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert len(drawn) == 8 and info["resumed_with"] == 4 and len(read_ground_truth(tmp_path / "p")[0]) == 12


def test_a_file_that_appears_while_the_pool_is_written_leaves_no_ground_truth_cut_short(tmp_path, monkeypatch):
    """A file the folder source lists that appears mid-run is named as a ValueError, not a RuntimeError,
    and ground_truth.csv is written whole or not at all (the rows before the stray one were kept)."""
    import spurfast.make_pool as M

    spec = PoolSpec(n=6, classes=2, min_size=16, max_size=16)
    real = M.render

    def render(i, label, spec):
        if i == 5:   # sorts after c0000's pool images: the rows before it were written
            (tmp_path / "p" / "c0000" / "zz.jpg").write_bytes(b"")
        return real(i, label, spec)

    monkeypatch.setattr(M, "render", render)
    with pytest.raises(ValueError, match=r"zz\.jpg.*make-pool did not write"):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert not list((tmp_path / "p").glob("ground_truth.csv*"))
    with pytest.raises(ValueError, match="is incomplete .*rerun the same"):
        read_ground_truth(tmp_path / "p")


def test_a_finished_pool_missing_images_is_refused_and_the_same_command_restores_it(tmp_path, caplog):
    """A copy cut short (or files removed) read as the whole pool: the same command said
    "already complete" and wrote nothing, the folder source took the images left, and the
    ground truth's rows fell on other images.  An image a machine crash left empty (make-pool
    no longer fsyncs each image) is written again too."""
    spec = PoolSpec(n=12, classes=2, min_size=16, max_size=16, plant="patch3", fraction=0.5, target_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    whole = {p.relative_to(tmp_path / "p"): p.read_bytes() for p in (tmp_path / "p").rglob("*.jpg")}
    gone = sorted(whole)[:2]
    for rel in gone:
        (tmp_path / "p" / rel).unlink()
    with pytest.raises(ValueError, match=r"holds 10 images, but its pool.json says make-pool wrote 12: .*rerun the "
                                         r"same make-pool command"):
        ImageFolderSource(tmp_path / "p", size=16)
    with caplog.at_level("WARNING", logger="spurfast"):
        info = make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert "already_complete" not in info and info["resumed_with"] == 10 and "holds 10 of its 12 images" in caplog.text
    assert {p.relative_to(tmp_path / "p"): p.read_bytes() for p in (tmp_path / "p").rglob("*.jpg")} == whole
    assert len(ImageFolderSource(tmp_path / "p", size=16)) == 12 and len(read_ground_truth(tmp_path / "p")[0]) == 12
    # an image emptied by a crash: rewritten by the resume of an interrupted pool
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    (tmp_path / "p" / "pool.json").write_text(json.dumps({"writer": info["writer"], "spec": None,
                                                          "writing": info["spec"]}))
    (tmp_path / "p" / gone[0]).write_bytes(b"")
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert (tmp_path / "p" / gone[0]).read_bytes() == whole[gone[0]]


def test_pools_of_other_seeds_share_the_noise_pattern_and_no_image():
    """A poisoned training pool and a suspect pool (other seeds) must carry one noise shortcut: the
    pattern's seed is its own (pools of seeds 1 and 2 carried noise correlated at 0.04)."""
    from spurfast.make_pool import pattern_overlay, render
    common = dict(n=40, classes=4, min_size=32, max_size=48, plant="noise", strength=0.5, fraction=0.5, target_size=32)
    train, pool = PoolSpec(seed=1, **common), PoolSpec(seed=2, **common)
    np.testing.assert_array_equal(pattern_overlay(train)[0], pattern_overlay(pool)[0])
    assert not np.array_equal(np.asarray(render(5, 1, train)), np.asarray(render(5, 1, pool)))
    other = pattern_overlay(PoolSpec(seed=1, pattern_seed=3, **common))[0]
    assert abs(np.corrcoef(other.ravel(), pattern_overlay(train)[0].ravel())[0, 1]) < 0.2
    with pytest.raises(ValueError, match="--pattern-seed must be >= 0, got -1"):
        PoolSpec(n=5, pattern_seed=-1).validate()


def test_a_pool_written_before_the_pattern_seed_existed_is_still_its_own_settings(tmp_path):
    """Its pool.json has no pattern_seed and drew its noise from --seed: the same command (seed 0)
    finds it complete, and one of another seed, whose noise differs, is refused."""
    from spurfast.make_pool import written_spec
    spec = PoolSpec(n=6, classes=2, min_size=16, max_size=16, plant="noise", strength=0.5, fraction=0.5,
                    target_size=16)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    info = json.loads((tmp_path / "p" / "pool.json").read_text())
    del info["spec"]["pattern_seed"]
    (tmp_path / "p" / "pool.json").write_text(json.dumps(info))
    assert written_spec(info["spec"])["pattern_seed"] == 0
    assert make_pool(tmp_path / "p", spec, workers=1, progress=False)["already_complete"]
    info["spec"]["seed"] = 7   # written by seed 7 before: its noise was seed 7's, not pattern seed 0's
    (tmp_path / "p" / "pool.json").write_text(json.dumps(info))
    with pytest.raises(FileExistsError, match="other settings"):
        make_pool(tmp_path / "p", replace(spec, seed=7), workers=1, progress=False)
# ---- mutation review (fifty-seventh session): bounds, sizes, carriers, footprints, quality, resuming

def test_size_quality_and_target_bounds_are_the_documented_ones():
    PoolSpec(n=10 ** 8).validate()   # README: at most 100,000,000 images
    with pytest.raises(ValueError, match="--n must be at most 100,000,000"):
        PoolSpec(n=10 ** 8 + 1).validate()
    for q in (1, 100):
        PoolSpec(n=5, quality=q).validate()
    with pytest.raises(ValueError, match=r"--quality must be in \[1, 100\], got 0"):
        PoolSpec(n=5, quality=0).validate()
    planted = dict(n=5, plant="pixel", fraction=0.2)
    PoolSpec(**planted, min_size=8, max_size=8, target_size=8).validate()
    with pytest.raises(ValueError, match="--target-size must be >= 8, got 7"):
        PoolSpec(**planted, min_size=8, max_size=8, target_size=7).validate()
    with pytest.raises(ValueError, match="at least as large as --target-size 64"):
        PoolSpec(**planted, min_size=63, max_size=80, target_size=64).validate()


def test_a_size_of_three_parts_is_refused():
    with pytest.raises(ValueError, match="--size must be N or MIN:MAX"):
        parse_size("32:48:64")


def test_rendered_sizes_cover_the_whole_range_and_no_more():
    from spurfast.make_pool import render

    spec = PoolSpec(n=200, min_size=8, max_size=10)
    sizes = [render(i, 0, spec).size for i in range(200)]
    assert {w for w, _ in sizes} == {8, 9, 10} and {h for _, h in sizes} <= {8, 9, 10}


@pytest.mark.parametrize("kw, msg", [
    (dict(n=6, classes=3, plant_class=3), r"--plant-class must be in \[0, 3\), got 3"),
    # with --n 3 only classes 0-2 hold images, whatever --classes says
    (dict(n=3, classes=5, plant_class=3), r"--fraction 1.0 of the 0 image\(s\) of --plant-class 3 among --n 3"),
])
def test_a_plant_class_that_holds_no_image_is_refused_at_any_fraction(tmp_path, kw, msg):
    spec = PoolSpec(**kw, min_size=16, max_size=16, plant="patch3", fraction=1.0, target_size=16)
    with pytest.raises(ValueError, match=msg):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("n, fraction, want", [(1, 0.6, 1), (100, 0.29, 29), (100, 0.57, 57)])
def test_the_carrier_count_is_the_nearest_to_the_fraction(n, fraction, want):
    """validate and _plan count carriers alike: 0.29 * 100 is 28.999999999999996 in floats."""
    from spurfast.make_pool import _plan

    spec = PoolSpec(n=n, min_size=16, max_size=16, plant="patch3", fraction=fraction, target_size=16)
    spec.validate()
    assert int(_plan(spec)[1].sum()) == want


def test_noise_strength_scales_the_planted_noise():
    from spurfast.make_pool import pattern_overlay

    spec = PoolSpec(n=4, min_size=16, max_size=16, plant="noise", strength=0.25, fraction=0.5, target_size=16, seed=3)
    values, mask = pattern_overlay(spec)
    full, _ = pattern_overlay(replace(spec, strength=1.0))
    assert mask.all() and values.shape == (16, 16, 3) and float(full.max()) > 0.9
    np.testing.assert_allclose(values, 0.25 * full, rtol=1e-6)


def test_plant_image_paints_each_pattern_pixel_over_its_exact_footprint():
    """A 28 x 28 grey image loaded at 16: output pixel 14 (the pixel pattern's, bottom right,
    margin 1) covers source [24.5, 26.25), i.e. rows/columns 24, 25, 26 by 0.5, 1 and 0.25; a
    source pixel becomes grey * (1 - cover) + white * cover, every other pixel stays grey."""
    from PIL import Image

    from spurfast.make_pool import pattern_overlay, plant_image

    values, mask = pattern_overlay(PoolSpec(n=2, min_size=28, max_size=28, plant="pixel", fraction=0.5,
                                            target_size=16))
    assert np.nonzero(mask) == (np.array([14]), np.array([14]))
    got = np.asarray(plant_image(Image.new("RGB", (28, 28), (100, 100, 100)), values, mask, additive=False))
    cover = np.zeros(28)
    cover[24:27] = [0.5, 1.0, 0.25]
    want = 100 + 155 * np.outer(cover, cover)   # e.g. (24, 25): 177.5, (26, 26): 109.6875
    assert np.abs(got.astype(float) - want[..., None]).max() <= 0.5 + 1e-9


def test_noise_is_added_to_the_carriers_image(tmp_path):
    """--plant noise adds its values (the image stays visible under them): plant_image's
    additive path, not the painted one that replaces the pixels."""
    from PIL import Image

    from spurfast.make_pool import _plan, _relpath, pattern_overlay, render

    spec = PoolSpec(n=4, classes=2, min_size=16, max_size=16, plant="noise", strength=0.5, fraction=1.0,
                    target_size=16, quality=100)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    labels, carries = _plan(spec)
    values, _ = pattern_overlay(spec)
    assert carries.all()
    for i in range(spec.n):
        want = np.clip(np.asarray(render(i, int(labels[i]), spec), float) / 255 + values, 0, 1)
        got = np.asarray(Image.open(tmp_path / "p" / _relpath(i, int(labels[i]), spec)), float) / 255
        # JPEG keeps each image's mean brightness (not its per-channel noise, chroma being subsampled):
        # added, the mean is the image's plus the noise's (about 0.25); painted over, about 0.25
        assert abs(got.mean() - want.mean()) < 0.02


def test_images_are_written_at_the_quality_asked_for(tmp_path):
    import io

    from spurfast.make_pool import _relpath, render

    spec = PoolSpec(n=3, classes=3, min_size=16, max_size=24, quality=20, seed=4)
    make_pool(tmp_path / "p", spec, workers=1, progress=False)
    for i in range(3):
        buf = io.BytesIO()
        render(i, i, spec).save(buf, "JPEG", quality=20)
        assert (tmp_path / "p" / _relpath(i, i, spec)).read_bytes() == buf.getvalue()


def test_a_numbered_stray_past_n_and_a_hidden_folder_on_resuming(tmp_path, monkeypatch):
    """An image named like a pool image but past --n is a stray (it raised IndexError); a hidden
    folder (".cache") is no class of the folder source and no stray."""
    spec, stray = _interrupted_with_a_stray(tmp_path, monkeypatch, "00000099.jpg")
    with pytest.raises(ValueError, match=r"00000099\.jpg.*make-pool did not write"):
        make_pool(tmp_path / "p", spec, workers=1, progress=False)
    stray.unlink()
    (tmp_path / "p" / ".cache").mkdir()
    info = make_pool(tmp_path / "p", spec, workers=1, progress=False)
    assert info["resumed_with"] == 4 and len(read_ground_truth(tmp_path / "p")[0]) == 12
