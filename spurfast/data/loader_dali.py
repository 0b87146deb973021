"""NVIDIA DALI input pipeline for image folders (the ``dali`` provider of the "loader" op).

:func:`iter_folder_batches` has the torch loader's signature and contract: it streams
the selected pool indices in order and yields ``(indices int64, images, ok bool)``
batches of ``batch_size`` (the last one may be smaller: never dropped, never padded
with duplicates).  A bad file yields a zero image with ok=False and its reason goes
into ``bad_files``.  Preprocessing is the one definition in :mod:`.preprocess`
(orientation, geometry, grey weights, uint8 rounding); DALI evaluates the same integer
geometry per sample inside the graph (:func:`_geometry`).

Pipeline (:func:`build_pipeline`): ``fn.readers.file`` over an explicit file list whose
labels are the *pool indices*, so every decoded sample carries its own index and the
loader checks alignment batch by batch; ``fn.decoders.image`` (``cpu`` with
``device_id=None`` on a CPU-only machine, ``mixed`` on a GPU with the hardware-decoder
share ``hw_decoder_load``); one ``fn.resize`` that maps the centre-crop window of the
source straight to size x size (same sampling positions as resize-then-crop, without
resampling pixels the crop throws away); ``fn.crop_mirror_normalize`` to CHW and the
output dtype (uint8 0..255; float32 / float16 in [0, 1]; bfloat16 is converted by torch
from uint8 since DALI has no bf16).  Outputs are copied into torch tensors with the
PyTorch plugin's ``feed_ndarray`` (on torch's current CUDA stream on a GPU).

Sharding is done on the index list (``folder.select_indices``: every ``num_shards``-th
index from ``shard_id``) rather than by the reader's contiguous shards, so a DALI run and
a torch run shard, resume (``start``) and order identically.

Bad files.  DALI 2.4 fails the whole pipeline on a truncated JPEG, a zero-byte file or a
non-image with an image name ("Critical error in pipeline"), and the pipeline is then
unusable; worse, some corrupt JPEG headers crash the process inside ``pipe.run()``
(SIGSEGV, nondeterministic), which no recovery can catch.  So (1) every piece of files
passes ``preprocess.validate_image_file`` (the torch loader's own check) in a background
thread before it enters a pipeline (bad: empty, unreadable, neither JPEG nor PNG, PIL
cannot open or verify it -- bad headers, PNG chunk CRCs --, over PIL's pixel limit;
suspect: no end marker, decided by a full PIL decode); (2) as a last resort, if a
pipeline still fails (a file PIL accepts but DALI's decoder rejects), the offending file
is taken from DALI's error message (it names the path), or, if it does not, found by
decoding the in-flight files one by one in a synchronous probe pipeline; it is marked
bad, and a new pipeline resumes at the first sample not yet yielded.  A failure no single
file reproduces is raised, not swallowed.

In-memory arrays stay on the torch path (``loader_torch.iter_batches`` slices them).
They are already decoded and usually small (MNIST-like); the work left per batch is one
slice and, at most, a dtype conversion, which is cheaper in torch than a copy into DALI
through ``external_source`` and back; nothing DALI accelerates (decoding, resampling)
applies to them.

Unverified here: the ``mixed`` (GPU) path.  The development machine has no GPU and the
GPU machine has no DALI; the GPU branch follows DALI's documented API and is exercised by
no test in this repository.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from ..checks import check_whole
from .folder import refuse_repeats, select_indices, warn_unreadable
from .preprocess import (GRAY_SHIFT, GRAY_WEIGHTS, PreprocessSpec, describe_error, load_image_uint8,
                         output_dtype, uint8_to, validate_image_file)
from .sources import utf8_name

log = logging.getLogger("spurfast.data")


def is_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (missing libs)
        return False, f"nvidia.dali is not importable ({exc.__class__.__name__}: {exc})"
    return True, ""


def resolve_device(device: str | None) -> str:
    """"cpu" or "gpu" (DALI's decoder then runs as "mixed")."""
    if device in (None, "auto"):
        return "gpu" if torch.cuda.is_available() else "cpu"
    d = str(device)
    if d == "cpu" or (d.startswith("cpu:") and d[4:].isdigit()):   # torch computes on "cpu:1" as on the CPU
        return "cpu"
    if d in ("gpu", "mixed") or d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"DALI loader device {device!r} needs a CUDA GPU, and torch sees none; "
                               "use device='cpu'")
        return "gpu"
    raise ValueError(f"DALI loader device must be 'cpu', 'gpu', 'cuda' or 'auto', got {device!r}")


def gpu_index(device: str | None) -> int:
    """The CUDA device a "gpu" ``device`` names: N for "cuda:N", else torch's current one
    (decoding ran on the current device whatever N said: `--device cuda:1` decoded every
    image on GPU 0 and copied it over)."""
    d = str(device)
    index = torch.device(d).index if d.startswith("cuda") else None
    if index is None:
        return torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"DALI loader device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return index


# ----------------------------------------------------------------------------- graph
def _geometry(images, size: int):
    """Per-sample ROI (roi_start, roi_end) in source pixels of the centre crop, using
    exactly ``preprocess.crop_geometry``'s integer formulas on the decoded shape.

    In INT64: ``2 * h * size`` overflowed INT32 for a 2 x 1,000,000 strip at size 1100 (a
    wrong crop, 176 levels from the torch loader).  The ROI is computed in float32, as it
    always was, while the resized shape is below 2**24 (float32's exact integers), and in
    float64 above it (float32 put a 3 x 999,999 strip's crop at size 700 8 levels off).

    Both axes at once, as (y, x) vectors: DALI runs every arithmetic node of the graph as
    an operator of its own over the whole batch (~1 us a sample each on a CPU), and the
    same formulas written per axis took 80 operators where these take 40 (3,000 pool JPEGs
    at 64, no pre-check: 3,900-4,300 -> 4,400-5,700 img/s); the same bits (416 shapes, extreme
    strips)."""
    from nvidia.dali import fn, types

    shape = images.shape(dtype=types.INT64)
    hw = shape[0:2]                            # (h, w)
    wh = fn.stack(shape[1], shape[0])          # (w, h): each axis's other side
    short = fn.cast(hw <= wh, dtype=types.INT64)   # 1 on the shorter side (both where square)
    longer = (hw * (2 * size) + wh) // (wh * 2)    # round_half_up(side * size / other side)
    new = longer + short * (size - longer)         # (nh, nw)
    off = (new - size) // 2                        # (top, left)
    bounds = fn.cat(off, off + size)               # (top, left, top + size, left + size)

    def roi(dtype):
        scale = fn.cast(hw, dtype=dtype) / fn.cast(new, dtype=dtype)   # (h / nh, w / nw)
        return fn.cast(bounds, dtype=dtype) * fn.cat(scale, scale)

    # 1.0 or 0.0: x * 1.0 + y * 0.0 is x exactly, so ordinary images keep their float32 ROI
    small = fn.cast(fn.reductions.max(new) < 1 << 24, dtype=types.FLOAT)
    both = small * roi(types.FLOAT) + (1 - small) * fn.cast(roi(types.FLOAT64), dtype=types.FLOAT)
    return both[0:2], both[2:4]


def _to_gray(images):
    """RGB uint8 HWC -> L uint8 HWC with PIL's fixed-point weights (preprocess.GRAY_WEIGHTS)."""
    from nvidia.dali import fn, types

    wr, wg, wb = GRAY_WEIGHTS

    def ch(c):
        return fn.cast(images[:, :, c], dtype=types.INT32)

    gray = (ch(0) * wr + ch(1) * wg + ch(2) * wb + (1 << (GRAY_SHIFT - 1))) // (1 << GRAY_SHIFT)
    gray = fn.cast(gray, dtype=types.UINT8)
    return fn.expand_dims(gray, axes=[2], new_axis_names="C")


_DALI_OUT = {torch.uint8: "UINT8", torch.bfloat16: "UINT8", torch.float32: "FLOAT", torch.float16: "FLOAT16"}


def build_pipeline(files: Sequence[str], labels: Sequence[int], *, size: int, channels: int = 3,
                   batch_size: int = 256, num_threads: int = 2, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, hw_decoder_load: float = 0.65,
                   prefetch_queue_depth: int = 2, synchronous: bool = False, seed: int = 0,
                   device_id: int | None = None):
    """A built DALI pipeline reading ``files`` in order, each labelled by ``labels``
    (the pool indices), producing (images (B, C, size, size), labels (B, 1) int32).

    ``device``: "cpu" (decoding on CPU threads, ``device_id=None``) or "gpu" (``mixed``
    decoding with ``hw_decoder_load`` of JPEGs on the hardware decoder where present) on
    CUDA device ``device_id`` (None: torch's current one).  ``synchronous``: no
    prefetching, so an error belongs to the batch just run (probes)."""
    from nvidia.dali import fn, pipeline_def, types

    if len(files) != len(labels) or not files:
        raise ValueError(f"build_pipeline needs as many labels as files (>0), got {len(files)} and {len(labels)}")
    spec = PreprocessSpec(size, channels)
    out_type = getattr(types, _DALI_OUT[output_dtype(dtype)])
    gpu = device == "gpu"
    files, labels = [str(f) for f in files], [int(x) for x in labels]

    @pipeline_def
    def spurfast_folder_pipeline():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                         name="reader")
        if gpu:
            images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                       hw_decoder_load=hw_decoder_load)
        else:
            images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        if spec.channels == 1:
            images = _to_gray(images)
        roi_start, roi_end = _geometry(images, spec.size)
        images = fn.resize(images, size=[spec.size, spec.size], roi_start=roi_start, roi_end=roi_end,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        scale = 1.0 if out_type == types.UINT8 else 255.0
        images = fn.crop_mirror_normalize(images, dtype=out_type, output_layout="CHW",
                                          mean=[0.0], std=[scale])
        return images, label

    kwargs = dict(batch_size=batch_size, num_threads=num_threads, seed=seed,
                  device_id=(torch.cuda.current_device() if device_id is None else device_id) if gpu else None)
    if synchronous:
        kwargs.update(prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    else:
        kwargs.update(prefetch_queue_depth=prefetch_queue_depth)
    pipe = spurfast_folder_pipeline(**kwargs)
    pipe.build()
    return pipe


# ------------------------------------------------------------------------ streaming
class _AlignmentError(RuntimeError):
    pass


_FILLER_LABEL = -1
_filler: list[str] = []


def _filler_file() -> str:
    """Path of a 2x2 grey PNG in a private temporary directory (made once per process; it
    goes at exit, and a later process removes it if this one was killed first)."""
    if not _filler:
        import atexit

        from PIL import Image

        from ..atomic_files import private_folder, release_folder

        d = str(private_folder("spurfast-dali-"))
        atexit.register(release_folder, d)
        path = os.path.join(d, "filler.png")
        Image.new("RGB", (2, 2), (128, 128, 128)).save(path)
        _filler.append(path)
    return _filler[0]


_aliases: dict[str, str] = {}


def _dali_name(path: str) -> str:
    """``path``, or, if it is not UTF-8 (a name decoded with surrogate escapes, which DALI's
    file list refuses, failing the whole pipeline), a link to it in the private directory
    of :func:`_filler_file`, made once per process."""
    try:
        path.encode()
        return path
    except UnicodeEncodeError:
        pass
    # keyed by the absolute path: a relative one, after a chdir, named another file, and
    # its link (made to the first one) decoded the first file's image in its place.  Joined,
    # not normalised (abspath): that drops "L/.." as text, so with L a link to a folder
    # elsewhere the link named ./x where "L/../x" opens the x beside L's target
    target = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    if target not in _aliases:
        link = os.path.join(os.path.dirname(_filler_file()), f"alias-{len(_aliases)}.img")
        os.symlink(target, link)
        _aliases[target] = link
    return _aliases[target]


def _to_torch(tl, dtype: torch.dtype, device: str, gpu_id: int | None = None) -> torch.Tensor:
    """Copy a DALI TensorList into a new torch tensor (on CUDA device ``gpu_id``, torch's
    current one if None, and its current stream on GPU)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tl.as_tensor()
    shape = tuple(dense.shape())
    dali_dtype = torch.uint8 if dtype == torch.bfloat16 else dtype
    if device == "gpu":
        gpu = torch.device("cuda", torch.cuda.current_device() if gpu_id is None else gpu_id)
        out = torch.empty(shape, dtype=dali_dtype, device=gpu)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(gpu))
    else:
        out = torch.empty(shape, dtype=dali_dtype)
        feed_ndarray(dense, out)
    return uint8_to(out, dtype) if dtype == torch.bfloat16 else out


def _labels_of(tl) -> np.ndarray:
    tl = tl.as_cpu() if hasattr(tl, "as_cpu") else tl
    return np.asarray(tl.as_tensor()).reshape(-1).astype(np.int64)


def _precheck(paths: Sequence[str], chunk: np.ndarray, spec: PreprocessSpec,
              stop: threading.Event | None = None) -> dict[int, str]:
    """Bad files of one chunk: ``preprocess.validate_image_file`` (the torch loader's
    check: header/end marker, PIL open + verify, PIL's pixel limit), and a full PIL
    decode of the suspects (to tell a truncated file from one with trailing bytes).
    Returns early (incomplete) once ``stop`` is set: the stream was closed."""
    bad = {}
    for i in chunk.tolist():
        if stop is not None and stop.is_set():
            break
        verdict, detail = validate_image_file(paths[i])
        if verdict == "bad":
            bad[i] = detail
        elif verdict == "suspect":
            try:
                load_image_uint8(paths[i], spec)
            except Exception as exc:
                bad[i] = f"{detail}: {describe_error(exc)}"
    return bad


def _dali_reason(message: str) -> str:
    """The operator's own words from a DALI "Critical error in pipeline" message."""
    text = message.split("encountered:", 1)[-1]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "pipeline object is no longer valid" not in ln and not ln.startswith("C++ context")]
    return "DALI: " + ("; ".join(lines)[:300] if lines else message.strip()[:300])


def _named_in_error(message: str, window: Sequence[int], paths: Sequence[str]) -> dict[int, str]:
    """Files of ``window`` that DALI's error message names (as a whole path token)."""
    found = {}
    for i in window:
        p = paths[i]
        m = re.search(r"(?:^|[\s:'\"])" + re.escape(p) + r"(?=$|[\s'\",])", message, flags=re.MULTILINE)
        if m:
            found[i] = _dali_reason(message)
    # Keep only the longest of nested matches (".../a/1.jpg" also matches "a/1.jpg").
    return {i: r for i, r in found.items()
            if not any(j != i and paths[j].endswith(paths[i]) and len(paths[j]) > len(paths[i]) for j in found)}


class _DaliStream:
    """Good samples of ``order`` in order, as (labels int64 array, images tensor) batches."""

    def __init__(self, paths, order, *, spec, batch_size, num_threads, device, dtype,
                 hw_decoder_load, prefetch_queue_depth, first_pipeline_batches, bad, gpu_id=None, said=()):
        self.paths, self.order, self.spec = paths, order, spec
        self.batch_size, self.num_threads, self.device, self.dtype = batch_size, num_threads, device, dtype
        self.hw_decoder_load, self.depth = hw_decoder_load, prefetch_queue_depth
        self.first_len = max(1, int(first_pipeline_batches)) * batch_size
        self.bad = bad
        self.said = said   # files already named unreadable this run (the source's bad_files)
        self.gpu_id = gpu_id
        self.rebuilds = 0

    def _pipe(self, idx, synchronous=False, batch_size=None):
        """A pipeline over ``idx``, its file list topped up with a tiny filler image so
        the last partial batch and the batches the pipeline prefetches past the end decode
        a few pixels each instead of wrapping round to real files (wasted work that is
        a whole ``prefetch_queue_depth`` batches per pipeline otherwise)."""
        B = batch_size or self.batch_size
        depth = 1 if synchronous else self.depth
        n_fill = (-len(idx)) % B + depth * B
        files = [_dali_name(self.paths[i]) for i in idx] + [_filler_file()] * n_fill
        labels = list(idx) + [_FILLER_LABEL] * n_fill
        return build_pipeline(files, labels, size=self.spec.size,
                              channels=self.spec.channels, batch_size=B,
                              num_threads=self.num_threads, device=self.device, dtype=self.dtype,
                              hw_decoder_load=self.hw_decoder_load,
                              prefetch_queue_depth=self.depth, synchronous=synchronous,
                              device_id=self.gpu_id)

    def _names(self, window) -> dict[int, str]:
        """The names DALI knows the files of ``window`` by (its errors quote them)."""
        return {i: _dali_name(self.paths[i]) for i in window}

    def _mark(self, found: dict[int, str]):
        for i, reason in list(found.items()):
            alias = _dali_name(self.paths[i])
            if alias != self.paths[i]:   # DALI's words name the link it read, gone at exit: the file
                found[i] = reason = reason.replace(alias, utf8_name(self.paths[i]))
            if i not in self.said:   # once a run (a trial read may have)
                warn_unreadable(self.paths[i], reason)
        self.bad.update(found)

    def _probe(self, window: list[int]) -> dict[int, str]:
        """Find the failing files of ``window``: decode them one per batch in a pipeline
        without prefetching.  The reader still reads ahead, so an error that names a file
        is charged to that file; an unnamed one to the sample just run, confirmed by a
        pipeline over that file alone (so a good file is never blamed for a neighbour)."""
        found, k = {}, 0
        while k < len(window):
            pipe = self._pipe(window[k:], synchronous=True, batch_size=1)
            try:
                while k < len(window):
                    pipe.run()
                    k += 1
            except RuntimeError as exc:
                named = _named_in_error(str(exc), window[k:], self._names(window[k:]))
                if named:
                    found.update(named)
                    window = window[:k] + [i for i in window[k:] if i not in named]
                else:
                    i = window[k]
                    alone = self._pipe([i], synchronous=True, batch_size=1)
                    try:
                        alone.run()
                    except RuntimeError as exc1:
                        found[i] = _dali_reason(str(exc1))
                    finally:
                        del alone
                    k += 1
            finally:
                del pipe
        return found

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        B = self.batch_size
        chunks = _pipeline_pieces(self.order, self.first_len)
        # set when the stream ends or is closed early (Ctrl-C, an error downstream): leaving
        # the executor waits for the running check, which covers all the rest of the pool
        # (measured ~0.05-0.1 ms a file from the page cache, far more on network storage)
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spurfast-precheck") as ex:
            try:
                fut = ex.submit(_precheck, self.paths, chunks[0], self.spec, stop)
                for c, chunk in enumerate(chunks):
                    found = fut.result()
                    if c + 1 < len(chunks):
                        fut = ex.submit(_precheck, self.paths, chunks[c + 1], self.spec, stop)
                    self._mark(found)
                    pending = [i for i in chunk.tolist() if i not in self.bad]
                    while pending:
                        done, failure = 0, None
                        pipe = self._pipe(pending)
                        try:
                            while done < len(pending):
                                # only the pipeline's own failures are a bad file's: torch's
                                # (CUDA out of memory copying a batch out) were probed file by
                                # file as one and reported as "no single file reproduces"
                                try:
                                    images, labels = pipe.run()
                                except RuntimeError as exc:
                                    # its traceback's frames hold the pipeline (pipe.run's self):
                                    # their locals go, so it is freed before the probe builds others
                                    traceback.clear_frames(exc.__traceback__)
                                    failure = exc
                                    break
                                k = min(B, len(pending) - done)
                                lab = _labels_of(labels)[:k]
                                expect = pending[done:done + k]
                                if not np.array_equal(lab, expect):
                                    raise _AlignmentError(
                                        f"DALI reader returned pool indices {lab[:8].tolist()}... where "
                                        f"{expect[:8]}... were expected; refusing to misalign the store")
                                batch = _to_torch(images, self.dtype, self.device, self.gpu_id)[:k]
                                done += k
                                yield lab, batch
                        finally:
                            del pipe
                        if failure is None:
                            pending = []
                            continue
                        window = pending[done:done + B * (self.depth + 2)]
                        found = _named_in_error(str(failure), window, self._names(window))
                        if not found:
                            log.warning("DALI pipeline failed without naming a file; probing %d files", len(window))
                            found = self._probe(window)
                        if not found:
                            raise RuntimeError(
                                f"DALI pipeline failed on files {self.paths[window[0]]} .. "
                                f"{self.paths[window[-1]]}, and no single file reproduces the failure; "
                                f"use the torch loader (--loader-backend torch; backend='torch' from Python) to go on. "
                                f"DALI said: {failure}") from failure
                        self._mark(found)
                        self.rebuilds += 1
                        pending = [i for i in pending[done:] if i not in found]
            finally:
                stop.set()


def _pipeline_pieces(order: np.ndarray, first: int) -> list[np.ndarray]:
    """``order`` in at most two pieces: the first ``first`` items, then all the rest.

    One pipeline decodes each piece.  DALI keeps ~25-40 MB of every pipeline it has built
    for the life of the process (measured, 2.4.0 CPU; neither gc nor ReleaseUnusedMemory
    gives it back), so peak memory follows the number of pipelines: two whatever the pool
    size (pieces doubling in length built 1 at 10k images and 3 at 100k, and the 100k pass
    peaked 158 MiB above the torch loader's).  The small first piece starts decoding at
    once, while the rest's files are checked in the background (measured 0.05-0.1 ms a
    file from the page cache on 2 busy cores, 5-10 s per 100k files, as
    ``preprocess.validate_image_file`` says; much of it overlaps the first piece's
    decoding)."""
    pieces = [order[:first], order[first:]]
    return [p for p in pieces if len(p)]


def iter_folder_batches(paths, *, size: int, channels: int = 3, batch_size: int = 256,
                        start: int = 0, shard_id: int = 0, num_shards: int = 1,
                        num_threads: int = 2, indices=None, dtype=torch.float32,
                        device: str | None = None, hw_decoder_load: float = 0.65,
                        prefetch_queue_depth: int = 2, first_pipeline_batches: int = 16,
                        bad_files: dict | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Loader-op signature shared with the torch loader: yields (indices, images, ok).

    Streams ``select_indices(len(paths), start=, shard_id=, num_shards=, indices=)`` in
    order, ``batch_size`` per batch (the last may be smaller).  ``num_threads`` DALI CPU
    threads.  ``dtype``: uint8 (0..255) or float32/float16/bfloat16 in [0, 1].  ``device``:
    "cpu", "gpu"/"cuda"/"cuda:N" (mixed decoding; images on CUDA device N, or the current
    one) or None/"auto" (GPU when torch sees one).  ``first_pipeline_batches``: batches of
    the first pipeline; a second one decodes the rest (its files are checked while the
    first decodes).  Bad files: zero image, ok=False, reason in ``bad_files``."""
    spec = PreprocessSpec(size, channels)
    dtype = output_dtype(dtype)
    check_whole(batch_size, "batch_size", not_integer=TypeError)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
    sel = select_indices(len(paths), start=start, shard_id=shard_id, num_shards=num_shards, indices=indices)
    if len(sel) == 0:
        return
    refuse_repeats(sel)
    # str: pathlib paths, which the torch loader takes, failed in the file list ("'PosixPath'
    # object has no attribute 'encode'")
    paths = [os.fspath(p) for p in paths]
    dev = resolve_device(device)
    gpu_id = gpu_index(device) if dev == "gpu" else None
    bad: dict[int, str] = {}
    # the pipelines' batch, capped at the images there are: its file list is topped up to
    # (prefetch depth + 1) batches and DALI buffers whole batches, so --batch-size 1e9 on 40
    # images was killed for memory at 23 GB (the batches yielded below are cut by batch_size)
    stream = iter(_DaliStream(paths, sel, spec=spec, batch_size=min(batch_size, len(sel)), num_threads=num_threads,
                              device=dev, dtype=dtype, hw_decoder_load=hw_decoder_load,
                              prefetch_queue_depth=prefetch_queue_depth,
                              first_pipeline_batches=first_pipeline_batches, bad=bad, gpu_id=gpu_id,
                              said=bad_files if bad_files is not None else ()))
    out_device = torch.device("cuda", gpu_id) if dev == "gpu" else torch.device("cpu")
    cur_lab, cur_img, pos = np.zeros(0, np.int64), None, 0
    for b0 in range(0, len(sel), batch_size):
        want = sel[b0:b0 + batch_size]
        ok = np.ones(len(want), dtype=bool)
        pieces = []  # (src images, src row, dst row, n rows)
        p = 0
        while p < len(want):
            if pos == len(cur_lab):
                nxt = next(stream, None)
                if nxt is None:
                    cur_lab, cur_img, pos = np.zeros(0, np.int64), None, 0
                else:
                    cur_lab, cur_img = nxt
                    pos = 0
            i = int(want[p])
            if pos < len(cur_lab) and cur_lab[pos] == i:
                m = min(len(cur_lab) - pos, len(want) - p)
                eq = cur_lab[pos:pos + m] == want[p:p + m]
                n = m if eq.all() else int(np.argmin(eq))
                pieces.append((cur_img, pos, p, n))
                pos += n
                p += n
            elif i in bad:
                ok[p] = False
                p += 1
            else:
                raise _AlignmentError(f"pool index {i} ({paths[i]}) is neither decoded nor marked bad")
        if len(pieces) == 1 and pieces[0][1] == 0 and pieces[0][3] == len(want) == len(pieces[0][0]):
            images = pieces[0][0]
        else:
            images = torch.zeros((len(want), spec.channels, spec.size, spec.size), dtype=dtype, device=out_device)
            for src, s, d, n in pieces:
                images[d:d + n] = src[s:s + n]
        if bad_files is not None:
            for j in np.nonzero(~ok)[0]:
                bad_files[int(want[j])] = bad[int(want[j])]
        yield torch.from_numpy(want.copy()), images, torch.from_numpy(ok)
