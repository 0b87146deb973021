"""Procedural ImageNet-like pools for scale tests and benchmarks (`spurfast make-pool`).

Writes ``n`` JPEGs of varied sizes into one folder per class (or one flat folder), with
content a classifier can learn: every class has its own shape family, colour and
count of objects, drawn over a random low-saturation background (gradient + noise)
that carries no class information.  Optionally a known pattern (the families of
:mod:`spurfast.plant`) is planted into a fraction of the images (all classes, or one
``plant_class``), and the ground truth is written next to the images:

- ``ground_truth.csv``: ``index,path,label,carries`` with ``index`` the pool index as
  :class:`spurfast.data.folder.ImageFolderSource` enumerates the folder;
- ``pool.json``: the parameters and counts, and the ``writer`` marker that lets
  ``--overwrite`` replace this folder (never one make-pool did not write).

An interrupted make-pool resumes: the same command (same settings) keeps the images
already written (each is written whole or not at all) and writes the rest; on a finished
pool it writes nothing.

Patterns are defined in the loader's output space: a pattern of the family at
``target_size`` x ``target_size`` is painted onto the window the loader keeps, each
pattern pixel over the exact source area that the loader's resize maps to that output
pixel (:func:`spurfast.data.preprocess.crop_geometry`), so after loading every carrier
shows the same pattern at the same place, as :func:`spurfast.plant.apply_pattern` would
stamp it.  Two things soften it: the loader's antialiasing filter reaches half an output
pixel beyond each footprint (pixels inside a pattern read their value exactly; a lone
pixel reads about 0.56 of its value plus 0.44 of its surroundings), and JPEG
compression (quality ``quality``).

Deterministic for a seed: image ``i`` depends only on (seed, i), so the output does not
depend on the number of worker processes.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("spurfast.make_pool")

SHAPES = ("disc", "square", "triangle", "ring", "stripes", "cross", "diamond", "checker")
PLANT_FAMILIES = ("pixel", "patch3", "patch5", "noise", "bar")
_JPEG_MAX_SIDE = 65_500   # libjpeg's limit on a JPEG's width and height
# file names hold 8 digits: past them "100000000.jpg" sorts before "99999999.jpg", and the
# folder's order (its pool indices) would no longer be the images' numbers in ground_truth.csv
MAX_IMAGES = 10 ** 8


@dataclass
class PoolSpec:
    """What `make_pool` writes: ``n`` JPEGs of ``classes`` procedural classes (one folder each,
    or one ``flat`` folder), sides from ``min_size`` to ``max_size``, with ``fraction`` of them
    (of ``plant_class``, or of all) carrying the ``plant`` pattern at ``strength``, drawn for
    images resized to ``target_size``; JPEG ``quality``; ``seed`` decides everything but the
    noise pattern, which ``pattern_seed`` draws: pools of different seeds (a poisoned training
    pool, a suspect pool) share one noise shortcut and no image."""
    n: int
    classes: int = 10
    min_size: int = 64
    max_size: int = 160
    flat: bool = False
    plant: str | None = None
    fraction: float = 0.0
    plant_class: int | None = None
    strength: float = 1.0
    target_size: int = 64
    quality: int = 90
    seed: int = 0
    pattern_seed: int = 0

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        # a slip of zeros (1e10) failed in numpy's allocator ("Unable to allocate 74.5 GiB", a
        # traceback) after the folder and its marker were made, which then refused the right --n
        if self.n > MAX_IMAGES:
            raise ValueError(f"--n must be at most {MAX_IMAGES:,} images, got {self.n:,}")
        if self.classes < 1:
            raise ValueError(f"--classes must be >= 1, got {self.classes}")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"image sizes must satisfy 8 <= min <= max, got {self.min_size}:{self.max_size}")
        # no JPEG is larger: past it the folder was made and then the first image failed
        # ("high is out of bounds for int64" for 8:2**63), or took 51 GB to render before it did
        if self.max_size > _JPEG_MAX_SIDE:
            raise ValueError(f"image sizes must be at most {_JPEG_MAX_SIDE:,} (the largest JPEG side), got "
                             f"--size {self.min_size}:{self.max_size}")
        from PIL import Image

        # past PIL's decompression-bomb limit both loaders mark an image bad (unread): a pool
        # of 20,000 px images would be written in full and then embedded as nothing
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and self.max_size ** 2 > 2 * limit:
            raise ValueError(f"--size {self.min_size}:{self.max_size}: images of up to {self.max_size:,} x "
                             f"{self.max_size:,} pixels pass PIL's limit of {2 * limit:,} pixels, and both loaders "
                             f"would mark those unreadable; at most {math.isqrt(2 * limit):,} per side (or raise "
                             f"PIL.Image.MAX_IMAGE_PIXELS)")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in [1, 100], got {self.quality}")
        # numpy's seeding refused a negative one in the workers, after the folder was made,
        # with "expected non-negative integer" naming no option
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.pattern_seed < 0:
            raise ValueError(f"--pattern-seed must be >= 0, got {self.pattern_seed}")
        if self.plant is not None:
            if self.plant not in PLANT_FAMILIES:
                raise ValueError(f"unknown plant family {self.plant!r} for image folders; expected one of "
                                 f"{PLANT_FAMILIES}")
            if not 0.0 < self.fraction <= 1.0:
                raise ValueError(f"--fraction must be in (0, 1] when planting, got {self.fraction}")
            if not 0.0 < self.strength <= 1.0:
                raise ValueError(f"--strength must be in (0, 1], got {self.strength}")
            # pixel/patch/bar paint the grey value `strength`, which a background can match
            # (the carrier then shows nothing while ground_truth.csv lists it); noise adds
            if self.plant != "noise" and self.strength < 1.0:
                raise ValueError(f"--strength {self.strength} is for --plant noise only (its amplitude); "
                                 f"--plant {self.plant} paints white (strength 1), since a grey value can "
                                 f"equal the background and leave a listed carrier unmarked")
            if self.plant_class is not None and not 0 <= self.plant_class < self.classes:
                raise ValueError(f"--plant-class must be in [0, {self.classes}), got {self.plant_class}")
            # the pattern's own checks (its seed below 2**64 - 7919), here: the workers met them
            # after the folder was made, and the corrected command was then refused it
            from .plant import PatternSpec
            PatternSpec(self.plant, strength=self.strength, seed=self.pattern_seed)
            # as _plan counts: a planted pool with no carrier has no ground truth to find
            cand = self.n if self.plant_class is None else len(range(self.plant_class, self.n, self.classes))
            if round(self.fraction * cand) == 0:
                of = "" if self.plant_class is None else f" of --plant-class {self.plant_class}"
                raise ValueError(f"--fraction {self.fraction} of the {cand} image(s){of} among --n {self.n} rounds "
                                 f"to no carrier: raise --fraction or --n")
            if self.target_size < 8:
                raise ValueError(f"--target-size must be >= 8, got {self.target_size}")
            # the loader upscales a smaller image, blending each planted pixel with its
            # neighbours (a lone pixel read 0.06-0.17 of its value at 16-48 px)
            if self.min_size < self.target_size:
                raise ValueError(f"planting needs images at least as large as --target-size {self.target_size}, "
                                 f"got --size {self.min_size}:{self.max_size}")
        elif self.fraction:
            raise ValueError("--fraction needs --plant FAMILY")
        # as --fraction: planting options without a family were ignored without a word
        elif self.plant_class is not None:
            raise ValueError(f"--plant-class {self.plant_class} needs --plant FAMILY (and --fraction)")
        elif self.strength != 1.0:
            raise ValueError(f"--strength {self.strength} needs --plant noise (and --fraction)")
        elif self.target_size != 64:   # the class default: any other size without a family was ignored
            raise ValueError(f"--target-size {self.target_size} needs --plant FAMILY (and --fraction)")


def parse_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '64:160' -> (64, 160)."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ValueError(f"--size must be N or MIN:MAX (integers), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"--size must be N or MIN:MAX, got {text!r}")
    return parts[0], parts[1]


def class_look(c: int, k: int) -> dict:
    """Shape family, hue and object count of class ``c`` (distinct for the first 8 x n_hues)."""
    n_hues = max(1, -(-k // len(SHAPES)))
    shape = SHAPES[c % len(SHAPES)]
    hue = ((c // len(SHAPES)) / n_hues + 0.37 * (c % len(SHAPES)) / len(SHAPES)) % 1.0
    return {"shape": shape, "hue": hue, "count": 1 + (c // len(SHAPES)) % 3}


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "disc":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "ring":
        d.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif shape == "stripes":
        w = max(2, int(r / 4))
        for x in range(int(cx - r), int(cx + r), 2 * w):
            d.rectangle([x, cy - r, x + w - 1, cy + r], fill=color)
    elif shape == "cross":
        w = max(2, int(r / 3))
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "checker":
        cell = max(2, int(r / 2))
        for i, y in enumerate(range(int(cy - r), int(cy + r), cell)):
            for j, x in enumerate(range(int(cx - r), int(cx + r), cell)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render(i: int, label: int, spec: PoolSpec) -> Image.Image:
    """Image ``i`` of class ``label`` (unplanted)."""
    rng = np.random.default_rng([spec.seed, i])
    w = int(rng.integers(spec.min_size, spec.max_size + 1))
    h = int(np.clip(round(w * rng.uniform(0.7, 1.4)), spec.min_size, spec.max_size))
    # background: a random low-saturation gradient plus noise (no class information)
    c0 = np.array(_hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9)), np.float32)
    c1 = np.array(_hsv(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.9)), np.float32)
    t = np.linspace(0.0, 1.0, w if rng.random() < 0.5 else h, dtype=np.float32)
    grad = c0[None] * (1 - t[:, None]) + c1[None] * t[:, None]
    bg = np.broadcast_to(grad[None], (h, w, 3)) if len(t) == w else np.broadcast_to(grad[:, None], (h, w, 3))
    bg = bg + rng.normal(0.0, 12.0, size=(h, w, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    look = class_look(label, spec.classes)
    s = min(w, h)
    for _ in range(look["count"]):
        r = s * rng.uniform(0.16, 0.3) / (1 + 0.25 * (look["count"] - 1))
        # objects stay mostly inside the centre square the loader keeps
        cx = w / 2 + rng.uniform(-0.25, 0.25) * s
        cy = h / 2 + rng.uniform(-0.25, 0.25) * s
        color = _hsv(look["hue"] + rng.normal(0, 0.02), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
        _draw_shape(d, look["shape"], cx, cy, r, color)
    return img


def pattern_overlay(spec: PoolSpec) -> tuple[np.ndarray, np.ndarray]:
    """(values (S, S, 3) float in [0, 1], mask (S, S) bool) of the planted pattern at the
    loader's output size S (noise: additive values, mask all True)."""
    import torch

    from .plant import PatternSpec, apply_pattern, noise_image
    # not spec.seed: a training pool and a suspect pool of other seeds carried unrelated noise
    ps = PatternSpec(spec.plant, strength=spec.strength, seed=spec.pattern_seed)
    S = spec.target_size
    if spec.plant == "noise":
        return (spec.strength * noise_image(ps, (3, S, S))).permute(1, 2, 0).numpy(), np.ones((S, S), bool)
    stamped, masks = apply_pattern(torch.zeros(1, 3, S, S), ps)
    return stamped[0].permute(1, 2, 0).numpy(), masks[0].numpy()


def _footprints(n_src: int, n_resized: int, offset: int, S: int) -> np.ndarray:
    """(n_src, S): how much of source pixel r (along one axis) lies in the footprint of
    crop pixel i, i.e. resized pixel ``offset + i``, which covers source
    [(offset + i) * n_src / n_resized, (offset + i + 1) * n_src / n_resized)."""
    scale = n_src / n_resized
    lo, hi = (offset + np.arange(S)) * scale, (offset + np.arange(S) + 1) * scale
    r = np.arange(n_src, dtype=np.float64)[:, None]
    return np.clip(np.minimum(r + 1, hi[None]) - np.maximum(r, lo[None]), 0.0, 1.0)


def plant_image(img: Image.Image, values: np.ndarray, mask: np.ndarray, additive: bool) -> Image.Image:
    """Paint the S x S pattern onto ``img`` where the loader's resize-and-crop reads it:
    pattern pixel (i, j) over its source footprint (fractionally at the footprint's edges),
    with the loader's own geometry (short side resized to S, long side rounded, crop
    offset in resized pixels), so that a pattern pixel lands on its own output pixel."""
    from .data.preprocess import crop_geometry

    w, h = img.size
    S = mask.shape[0]
    nh, nw, top, left = crop_geometry(h, w, S)
    ay, ax = _footprints(h, nh, top, S), _footprints(w, nw, left, S)  # (h, S), (w, S)
    arr = np.asarray(img, dtype=np.float64) / 255.0
    m = mask.astype(np.float64)
    vm = values.astype(np.float64) * m[..., None]
    painted = np.stack([ay @ vm[..., c] @ ax.T for c in range(vm.shape[2])], axis=-1)
    if additive:
        arr = np.clip(arr + painted, 0.0, 1.0)
    else:
        cover = np.clip(ay @ m @ ax.T, 0.0, 1.0)[..., None]  # share of each source pixel the pattern owns
        arr = np.clip(arr * (1.0 - cover) + painted, 0.0, 1.0)
    return Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), "RGB")


def _plan(spec: PoolSpec) -> tuple[np.ndarray, np.ndarray]:
    """(labels, carries) of every image index, from the seed alone."""
    # the same labels (with n <= classes each image i is label i): % a --classes past int64
    # raised OverflowError after the folder was made
    labels = np.arange(spec.n, dtype=np.int64) % min(spec.classes, spec.n)
    carries = np.zeros(spec.n, bool)
    if spec.plant is not None:
        cand = np.arange(spec.n) if spec.plant_class is None else np.nonzero(labels == spec.plant_class)[0]
        rng = np.random.default_rng([spec.seed, 104729])
        k = int(round(spec.fraction * len(cand)))
        carries[rng.choice(cand, size=k, replace=False)] = True
    return labels, carries


def class_dir(label: int, classes: int) -> str:
    """Class folder name, zero-padded to the widest label so that sorted folder order (the
    folder source's labels) is label order also past 10,000 classes."""
    return f"c{label:0{max(4, len(str(classes - 1)))}d}"


def _relpath(i: int, label: int, spec: PoolSpec) -> str:
    name = f"{i:08d}.jpg"
    return name if spec.flat else f"{class_dir(label, spec.classes)}/{name}"


_WORKER: dict = {}


def _init_worker(spec: PoolSpec, out: str, labels, carries):
    _WORKER.update(spec=spec, out=out, labels=labels, carries=carries,
                   pattern=pattern_overlay(spec) if spec.plant else None)


def _write_range(bounds: tuple[int, int]) -> tuple[int, int]:
    """(images done, images written now) of ``bounds``: an image an interrupted run of the
    same settings wrote is kept (each is written whole, or not at all)."""
    from .atomic_files import replace_atomically

    spec, out = _WORKER["spec"], _WORKER["out"]
    lo, hi = bounds
    written = 0
    for i in range(lo, hi):
        label = int(_WORKER["labels"][i])
        path = Path(out) / _relpath(i, label, spec)
        # an empty one: a machine crash kept the rename and lost the bytes (no fsync per image)
        if path.exists() and path.stat().st_size > 0:
            continue
        img = render(i, label, spec)
        if _WORKER["carries"][i]:
            values, mask = _WORKER["pattern"]
            img = plant_image(img, values, mask, additive=spec.plant == "noise")
        replace_atomically(path, lambda fh, img=img: img.save(fh, "JPEG", quality=spec.quality), "wb",
                           durable=False)   # one sync for all, before pool.json says the pool is whole
        written += 1
    return hi - lo, written


POOL_WRITER = "spurfast make-pool"  # pool.json's "writer": marks a folder --overwrite may delete


def _pool_info(out: Path) -> dict | None:
    """``out``'s pool.json as a dict, or None (missing, unreadable, not an object)."""
    try:
        info = json.loads((Path(out) / "pool.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _written_by_make_pool(info: dict | None) -> bool:
    """Whether a folder's pool.json (`_pool_info`) is one that make-pool wrote (with its writer
    marker, or the keys of a pool written before the marker existed)."""
    # None: missing or unreadable proves nothing, keep the folder
    return info is not None and (info.get("writer") == POOL_WRITER or {"spec", "n_carrying", "classes"} <= info.keys())


def make_pool(out_dir, spec: PoolSpec, *, workers: int | None = None, progress: bool = True,
              overwrite: bool = False) -> dict:
    """Write the pool; returns the contents of ``pool.json``."""
    from tqdm.auto import tqdm

    from .atomic_files import replace_atomically
    from .cores import usable_cores
    from .data.folder import list_folder

    # numpy numbers (a count taken from an array) as Python ones: PIL refused a numpy --quality
    # ("Invalid quality setting") once the folder was made, and json the others at the final
    # pool.json, after every image was written, leaving the pool marked unfinished.  Before the
    # checks: an int32 size squared wrapped negative and passed the pixel-limit check
    spec = replace(spec, **{k: v.item() for k, v in asdict(spec).items() if isinstance(v, np.generic)})
    spec.validate()
    # planned before the folder is made: a plan too large for memory fails with nothing written
    try:
        labels, carries = _plan(spec)
    except MemoryError:
        raise ValueError(f"--n {spec.n:,}: the plan of the pool (9 bytes an image) does not fit in memory; "
                         f"write a smaller pool") from None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"pool directory {out} is a file")
    # a file above it failed at mkdir with a bare "[Errno 20] Not a directory: 'FILE/x'"
    blocker = next((q for q in out.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"pool directory {out}: {blocker} is a file, not a folder")
    # a dangling link failed at mkdir with a bare "[Errno 17] File exists"
    broken = next((q for q in (out, *out.parents) if q.is_symlink() and not q.exists()), None)
    if broken is not None:
        raise FileNotFoundError(f"pool directory {out}: {broken} is a link to {os.readlink(broken)!r}, which does "
                                f"not exist")
    resume = False
    if out.is_dir():
        # a run killed while it wrote the first marker (SIGKILL: no clean-up ran) left only its
        # temporary file, and every rerun, --overwrite too, refused the folder as not make-pool's
        entries = list(out.iterdir())
        if entries and all(_marker_leftover(e) for e in entries):
            for e in entries:
                e.unlink(missing_ok=True)
    if out.exists() and any(out.iterdir()):
        info = _pool_info(out)
        if not _written_by_make_pool(info):
            raise FileExistsError(f"pool directory {out} is not empty and was not written by make-pool (no "
                                  f"make-pool pool.json); make-pool never deletes such a directory, even with "
                                  f"--overwrite: choose a new or empty directory")
        writing = written_spec(_unfinished_spec(info))
        same = written_spec(info.get("spec")) == json.loads(json.dumps(asdict(spec)))
        held = len(list_folder(out)[0]) if same and not overwrite else None
        if not overwrite and same and (out / "ground_truth.csv").is_file() and held == info.get("n"):
            # the same command again on its finished pool was refused as "not empty", where an
            # interrupted one resumed: there is nothing to write
            log.info("pool %s is already complete with these settings; nothing to write", out)
            return dict(info, already_complete=True)
        if held is not None and held != info.get("n"):   # a copy cut short: it read as complete
            log.warning("pool %s holds %d of its %s images: writing the missing ones", out, held, info.get("n"))
        # a finished pool of these settings without its ground_truth.csv (deleted) is resumed,
        # which writes it again: it was refused as "a make-pool pool of other settings"
        resume = not overwrite and (writing == asdict(spec) or same)
        if not overwrite and not resume:
            # a finished pool of other settings was "not empty" and no more
            other = (" (an interrupted make-pool of other settings: its own command resumes it)"
                     if writing is not None else " (a make-pool pool of other settings)")
            raise FileExistsError(f"pool directory {out} is not empty{other}; choose another or pass --overwrite")
    if resume:
        # a temporary image of a writer killed mid-save; the ground truth is written at the end
        for tmp in [*out.glob("**/*.jpg.*.tmp"), *filter(_marker_leftover, out.glob("pool.json.*.tmp")),
                    *filter(_ground_truth_leftover, out.glob("ground_truth.csv.*.tmp"))]:
            tmp.unlink(missing_ok=True)
        # checked before any image is drawn: a file make-pool did not write was found only when the
        # ground truth was written, after every remaining image (hours at scale)
        stray = _strays(out, spec, labels)
        if stray:
            raise _stray_error(out, stray)
        (out / "ground_truth.csv").unlink(missing_ok=True)
        log.info("resuming the interrupted pool in %s", out)
    elif out.exists() and any(out.iterdir()):
        import shutil
        # an overwrite cut short (Ctrl-C on seeing the wrong --out) left the old pool.json, which
        # says the pool is whole, and its ground truth over part of it: the ground truth goes
        # first, then a finished pool's pool.json is marked unfinished (in the space that
        # freed, on a full disk; an unfinished one, say cut short by that disk, stays as it is)
        gt = out / "ground_truth.csv"
        if gt.is_file() or gt.is_symlink():
            gt.unlink()
        if json.loads((out / "pool.json").read_text()).get("spec") is not None:
            _write_whole(out / "pool.json", json.dumps({"writer": POOL_WRITER, "spec": None}))
        # the folder is emptied, not removed: --out may be a link to the pool (rmtree refuses
        # links; the link is kept) or "." (rmdir refuses it, after the pool was deleted);
        # pool.json last, so a folder half emptied by Ctrl-C can still be overwritten
        for entry in sorted(out.iterdir(), key=lambda e: e.name == "pool.json"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    # marker first, so a pool cut off mid-write can still be overwritten; spec None until
    # it is complete, so nothing takes it for a finished pool of that spec; "writing": the
    # settings being written, which a rerun of the same command resumes
    _write_whole(out / "pool.json", json.dumps({"writer": POOL_WRITER, "spec": None, "writing": asdict(spec)}))
    if not spec.flat:
        for c in range(min(spec.classes, spec.n)):
            (out / class_dir(c, spec.classes)).mkdir(exist_ok=True)
    workers = max(1, workers or usable_cores())
    chunk = 256
    ranges = [(s, min(s + chunk, spec.n)) for s in range(0, spec.n, chunk)]
    t0 = time.perf_counter()
    bar = tqdm(total=spec.n, desc="writing pool", unit="img", disable=not progress)
    written = 0
    if workers == 1 or spec.n <= chunk:
        _init_worker(spec, str(out), labels, carries)
        for done, new in map(_write_range, ranges):
            bar.update(done)
            written += new
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(spec, str(out), labels, carries)) as pool:
            for done, new in pool.imap_unordered(_write_range, ranges):
                bar.update(done)
                written += new
    bar.close()
    seconds = time.perf_counter() - t0
    # ground truth in the order the folder source enumerates the pool
    paths, _, _ = list_folder(out)
    # a file that appeared during the run (the check above ran before it)
    stray = [Path(p) for p in paths if _pool_index(out, Path(p), spec, labels) is None]
    if stray:
        raise _stray_error(out, stray)

    def write_ground_truth(fh):
        w = csv.writer(fh)
        w.writerow(["index", "path", "label", "carries"])
        for idx, p in enumerate(paths):
            i = _pool_index(out, Path(p), spec, labels)
            w.writerow([idx, os.path.relpath(p, out), int(labels[i]), int(carries[i])])

    # whole or not at all: a run cut short mid-write left fewer rows than images
    replace_atomically(out / "ground_truth.csv", write_ground_truth, newline="")
    if hasattr(os, "sync"):   # every image on the disk before the marker below says the pool is whole
        os.sync()
    info = {"writer": POOL_WRITER, "spec": asdict(spec), "n": spec.n, "n_carrying": int(carries.sum()),
            # the classes the pool holds: one entry per --classes took 1.7 GB and 25 s for a
            # 4-image pool of --classes 1000000 (as the class folders, only those made)
            "classes": [dict(class_look(c, spec.classes), label=c) for c in range(min(spec.classes, spec.n))],
            # of this run: images an interrupted run had written are kept, not counted
            "seconds": round(seconds, 2), "images_per_s": round(written / max(seconds, 1e-9), 1),
            "resumed_with": spec.n - written}
    _write_whole(out / "pool.json", json.dumps(info, indent=1))
    return info


def _pool_index(out: Path, path: Path, spec: PoolSpec, labels) -> int | None:
    """The number of the image make-pool writes at ``path`` (in pool folder ``out``), or None
    for a file it does not write there."""
    try:
        rel = path.relative_to(out).as_posix()
    except ValueError:
        return None
    name = rel.rpartition("/")[2]
    if not (len(name) == 12 and name.endswith(".jpg") and name[:8].isascii() and name[:8].isdigit()):
        return None
    i = int(name[:8])
    return i if i < spec.n and _relpath(i, int(labels[i]), spec) == rel else None


def _strays(out: Path, spec: PoolSpec, labels) -> list[Path]:
    """What the folder source would read in ``out`` as pool images (or, in a class-folder pool,
    as classes) that make-pool does not write there."""
    from .data.folder import _hidden, _image_files

    stray = [p for p in _image_files(out) if _pool_index(out, p, spec, labels) is None]
    if not spec.flat:
        classes = {class_dir(c, spec.classes) for c in range(min(spec.classes, spec.n))}
        stray += sorted(e for e in out.iterdir() if e.is_dir() and not _hidden(e.name) and e.name not in classes)
    return stray


def _stray_error(out: Path, stray: list[Path]) -> ValueError:
    more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
    return ValueError(f"pool directory {out} holds {stray[0]}{more}, which make-pool did not write and the "
                      f"ground truth cannot list: remove it (or move it elsewhere) and rerun the same command, "
                      f"or pass --overwrite to delete it with the pool and write the pool anew")


def written_spec(spec: dict | None) -> dict | None:
    """A pool.json spec as `PoolSpec` fields today: one written before ``pattern_seed`` existed
    drew its noise from its ``seed``."""
    if not isinstance(spec, dict) or "pattern_seed" in spec:
        return spec
    return dict(spec, pattern_seed=spec.get("seed"))


def _unfinished_spec(info: dict | None) -> dict | None:
    """The settings an interrupted make-pool was writing, from a folder's pool.json marker
    (`_pool_info`), or None: a finished pool, or a marker from before the settings were recorded."""
    if info is None or info.get("spec") is not None or not isinstance(info.get("writing"), dict):
        return None
    return info["writing"]


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: cut short (Ctrl-C, a full disk), a
    pool.json no longer parsed as the marker, and every rerun, --overwrite included, was
    refused as "not written by make-pool" (the first marker too: an empty pool.json left by
    a full disk kept the folder refused after space was freed)."""
    from .atomic_files import replace_atomically
    replace_atomically(path, lambda fh: fh.write(text))


def _marker_leftover(entry: Path) -> bool:
    """Whether ``entry`` is the temporary pool.json (``pool.json.PID.tmp``) of a make-pool
    killed while writing it (its process gone)."""
    from .atomic_files import killed_writer_target
    return killed_writer_target(entry, lambda name: name == "pool.json") is not None


def _ground_truth_leftover(entry: Path) -> bool:
    """Whether ``entry`` is the temporary ground_truth.csv of a make-pool killed while writing it."""
    from .atomic_files import killed_writer_target
    return killed_writer_target(entry, lambda name: name == "ground_truth.csv") is not None


def refuse_unfinished(pool_dir) -> dict | None:
    """``pool_dir``'s pool.json (`_pool_info`); raises ValueError when it marks a make-pool run
    that was cut short (Ctrl-C, a kill): "spec" stays None until the last image is written."""
    info = _pool_info(pool_dir)
    if info is not None and info.get("writer") == POOL_WRITER and info.get("spec") is None:
        raise ValueError(f"pool {pool_dir} is incomplete (its make-pool run was interrupted); rerun the same "
                         f"make-pool command to finish it, or with --overwrite to write it anew")
    return info


def refuse_changed(pool_dir, info: dict | None, n_listed: int) -> None:
    """Raise ValueError when ``info`` (`refuse_unfinished`'s) is a finished make-pool pool of
    another image count than the ``n_listed`` images found: a copy cut short, or files removed,
    read as the whole pool, and its ground truth's rows fell on other images."""
    if info is not None and info.get("writer") == POOL_WRITER and isinstance(info.get("n"), int) \
            and info["n"] != n_listed:
        raise ValueError(f"pool {pool_dir} holds {n_listed} images, but its pool.json says make-pool wrote "
                         f"{info['n']}: images were removed or added since; rerun the same make-pool command to "
                         f"write the missing ones, or remove pool.json to read the folder as a plain image folder")


def read_ground_truth(pool_dir) -> tuple[np.ndarray, np.ndarray]:
    """(labels, carries) in pool-index order from a pool's ground_truth.csv; raises
    ValueError for a pool whose make-pool was cut short, or whose ground truth has
    another number of rows than pool.json's image count."""
    p = Path(pool_dir) / "ground_truth.csv"
    # first: a make-pool cut short has no ground_truth.csv yet (written whole, last), which is not
    # "not written by make-pool"; one from before that could be cut short, and its rows were
    # returned as the pool's whole ground truth
    info = refuse_unfinished(pool_dir)
    if not p.is_file():
        raise FileNotFoundError(f"{pool_dir} has no ground_truth.csv (not written by `spurfast make-pool`)")
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if info is not None and isinstance(info.get("n"), int) and info["n"] != len(rows):
        raise ValueError(f"{p} has {len(rows)} rows, but {pool_dir}/pool.json says the pool holds {info['n']} "
                         f"images")
    labels = np.array([int(r["label"]) for r in rows], np.int64)
    carries = np.array([r["carries"] == "1" for r in rows], bool)
    return labels, carries
