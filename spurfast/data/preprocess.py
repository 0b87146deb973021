"""The one definition of image preprocessing, shared by the torch and DALI loaders.

decode -> RGB (or L for channels=1) -> resize the shorter side to ``size`` (bilinear,
antialiased, the filter clamped to the edge pixel at the border) -> centre crop size x size
-> CHW float32 in [0, 1].  Mean/std normalisation is *not* done here: the VAE encoder fuses
it into its first layer.

Every number the two loaders must agree on is defined here once and used by both:

* orientation: the EXIF orientation tag is honoured (DALI's decoder does so by default;
  the PIL path reads the tag as DALI's EXIF reader does, :func:`_exif_orientation`, and
  transposes as :func:`PIL.ImageOps.exif_transpose` does), and only the EXIF tag: not
  XMP's ``tiff:Orientation`` nor a PNG's "Raw profile type exif" text, which PIL's
  ``getexif()`` also reads and DALI ignores.
* geometry (:func:`crop_geometry`): the shorter side becomes ``size``, the longer side
  ``round_half_up(long * size / short)`` computed in integers; the crop offset is
  ``(resized - size) // 2`` in each axis.  The scale per axis is ``source / resized``,
  i.e. the sampling positions of resizing the whole image to (nh, nw) and cropping; both
  loaders resample only the crop window of the source (PIL ``resize(box=)``, DALI's ROI),
  so an extreme aspect ratio costs no more than a square image.  The DALI graph evaluates
  the same integer formulas per sample (``loader_dali._geometry``).
* grey (channels=1): ITU-R 601-2 luma with PIL's fixed-point weights
  ``(19595 R + 38470 G + 7471 B + 32768) >> 16`` applied to the decoded RGB image
  (:data:`GRAY_WEIGHTS`), then resized.
* quantisation: the resized image is rounded to uint8 before scaling to [0, 1], so the
  uint8 output of either loader is the float output times 255.

What cannot be made identical is bounded by tests/test_loader_parity.py: the JPEG
decoders (both libjpeg-turbo, measured bit-identical on our test images), the
antialiased-bilinear resamplers' rounding (PIL's filter renormalises at image borders where
DALI's clamps to the edge pixel: the torch loader resamples a window whose edge pixels are
repeated, :func:`_edge_clamped_window`, so they agree there too) and
16-bit *colour* PNGs (RGB, RGBA, grey + alpha), which Pillow decodes to 8 bits keeping
the high byte (``v >> 8``; it has no rounding unpacker) where DALI rounds (``v / 257``):
at most 1 level apart before resampling.  16-bit grey is rounded here as DALI does.

Bad files: :func:`validate_image_file` is the one pre-decode check both loaders use,
so they agree on which files are bad and why: first :func:`check_image_file` (empty file,
unreadable file, content that is neither JPEG nor PNG, a missing end marker), then PIL's
``Image.open`` + ``verify()`` (the header structure; for PNG every chunk's CRC; no pixel
decoding), which also applies PIL's pixel limit to both loaders, then, for JPEG, what
DALI's marker parser refuses and PIL skips (stray bytes between the header segments, see
``_jpeg_marker_error``) or decodes all black (CMYK without Adobe's marker), for PNG, what
libpng (DALI's decoder) refuses and PIL decodes: a side over 1,000,000 pixels, an unknown
critical chunk, a palette image without PLTE, and other chunk sequences (see
``_png_chunk_error``); and what PIL refuses only when it decodes: a malformed ancillary
chunk after the image data (``_png_trailer_check``).  A
file that passes but has no end marker (in its last 1 KiB; for a JPEG, after its scans)
is "suspect" and is then fully decoded by PIL to decide.  A file that fails never enters
a DALI pipeline: a corrupt JPEG header can crash DALI's decoder outright (SIGSEGV, not
a catchable pipeline error).  Not caught without decoding, and so still treated
differently: damaged JPEG *scan* data (see tests/test_loader_parity.py), and PNG image
data whose zlib stream holds fewer rows than the image or lacks its checksum (PIL decodes
it, the missing rows black; DALI refuses it, found by a pipeline rebuild and named in its
decoder's words).  Catching those would inflate every PNG's data: 30-50% of a decode.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# PIL's "L" conversion in fixed point: (19595 R + 38470 G + 7471 B + 0x8000) >> 16.
GRAY_WEIGHTS = (19595, 38470, 7471)
GRAY_SHIFT = 16

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"IEND"
# the critical chunks libpng knows; it refuses any other whose type starts with a capital
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
# How far from the end of the file the end marker may sit (files with a little trailing
# padding are common and valid); further away the file is only "suspect", not bad.
_TAIL_BYTES = 1024
# libpng's default limit on a PNG's width and height, which DALI's decoder keeps (it
# refuses a 1 x 1,000,001 PNG that PIL decodes): the pre-check applies it for both loaders
_PNG_MAX_SIDE = 1_000_000
# PIL modes of wide (16/32-bit integer) grey images
_WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 64
    channels: int = 3

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"image size must be a positive integer, got {self.size!r}")
        # whole numbers only: 3.0 and True passed `in (1, 3)`, then failed at the first bad file's
        # stand-in image with a TypeError naming neither the setting nor the input
        if (not isinstance(self.channels, (int, np.integer)) or isinstance(self.channels, bool)
                or self.channels not in (1, 3)):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")


def _round_div_half_up(num: int, den: int) -> int:
    """round(num / den) with halves rounded up, in exact integer arithmetic."""
    return (2 * num + den) // (2 * den)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Shape after resizing the shorter side to ``size`` (long side rounded half up)."""
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {h}x{w}")
    if h <= w:
        return size, max(size, _round_div_half_up(w * size, h))
    return max(size, _round_div_half_up(h * size, w)), size


def crop_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(nh, nw, top, left): resized shape and centre-crop offset in resized pixels."""
    nh, nw = resized_shape(h, w, size)
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def check_image_file(path: str) -> tuple[str, str]:
    """Cheap pre-decode check of one file: ("ok" | "suspect" | "bad", detail).

    "bad": unreadable, empty, or neither JPEG nor PNG content (whatever its name says).
    "suspect": JPEG/PNG header but no end marker near the end (typically truncated), for a
    JPEG none that ends the file (zero padding aside); a full decode decides.  Reads 16
    bytes at the start and 1 KiB at the end."""
    try:
        size = os.stat(path).st_size
        if size == 0:
            return "bad", "empty file (0 bytes)"
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read(_TAIL_BYTES)
    except OSError as exc:
        if os.path.islink(path) and not os.path.exists(path):
            return "bad", f"broken symbolic link (to {os.readlink(path)})"
        return "bad", f"cannot read file: {exc.__class__.__name__}: {exc.strerror or exc}"
    if head.startswith(_JPEG_MAGIC):
        # the end marker must close the file (zero padding aside): anywhere in the tail, an EXIF
        # thumbnail's own marker passed a photo cut within 1 KiB after it, which cost DALI a
        # failed pipeline and a rebuild per such file (a longer tail is walked, below)
        kind, complete = "JPEG", tail.rstrip(b"\0").endswith(_JPEG_EOI)
    elif head.startswith(_PNG_MAGIC):
        kind, complete = "PNG", _PNG_IEND in tail
    else:
        return "bad", f"not a JPEG or PNG file (first bytes {head[:8].hex(' ')})"
    if not complete:
        return "suspect", f"{kind} without end marker (truncated?)"
    return "ok", kind


def validate_image_file(path: str, cheap: tuple[str, str] | None = None) -> tuple[str, str]:
    """The shared pre-decode check of both loaders: ("ok" | "suspect" | "bad", detail).

    :func:`check_image_file`, then PIL's ``Image.open`` (parses the JPEG markers up to
    the scan / the PNG chunks up to the first IDAT, checking their CRCs) and ``verify()``
    (for PNG: the CRC of every remaining chunk through IEND; a no-op for JPEG).  Nothing
    is decoded, but the JPEG marker parse is pure Python: measured ~0.1 ms per 64-160 px
    JPEG (2 busy CPU cores), some 15% of a PIL decode + resize of such a file; the DALI
    loader runs it in a background thread.  "bad" detail: the cheap check's reason or
    PIL's exception; otherwise the cheap check's verdict and detail, but "ok" for a file
    with over 1 KiB after an end marker these checks find (after a JPEG's scans, a PNG's
    whole IEND).

    Huge images: ``Image.open`` raises ``DecompressionBombError`` above PIL's limit
    (2 x ``Image.MAX_IMAGE_PIXELS``, ~179 MP by default), and since both loaders call
    this first, both mark such a file bad (DALI would otherwise decode it, a half-GB
    RGB buffer per image and per decoding thread).  One policy for both loaders, set
    in one place: raise or lower ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit).  A PNG
    with a side over 1,000,000 pixels (libpng's limit, which DALI's decoder keeps) is bad
    for both loaders too, and so is one whose chunk sequence libpng refuses and PIL
    accepts (an unknown critical chunk, a palette image without PLTE, ...), or one with a
    chunk after its image data that PIL's decode refuses (a truncated pHYs, say), and so
    is a JPEG with stray bytes among its header segments (DALI's parser refuses them).

    ``cheap``: ``check_image_file(path)`` where the caller has it (not read twice)."""
    if cheap is None:
        plain = _validate_plain_jpeg(path)
        if plain is not None:
            return plain
    verdict, detail = check_image_file(path) if cheap is None else cheap
    if verdict == "bad":
        return verdict, detail
    from PIL import Image

    try:
        with Image.open(path, formats=("JPEG", "PNG")) as im:
            shape = im.size
            im.verify()
    except Exception as exc:  # PIL raises many exception types for corrupt files
        kind = "PNG" if detail.startswith("PNG") else "JPEG"
        return "bad", f"{kind} rejected by PIL: {describe_error(exc)}"
    if detail.startswith("JPEG"):
        why = _jpeg_marker_reason(_jpeg_marker_error(path))
        if why:
            return "bad", why
        if verdict == "suspect" and _jpeg_ends_after_its_scans(path):
            # an end marker followed by over 1 KiB of data (a phone's trailer, an MPO's second
            # image) is no truncation: a suspect was decoded whole by PIL in DALI's pre-check
            # (250 ms for a 12 MP photo, on its one thread) before DALI decoded it again
            return "ok", "JPEG"
    if detail.startswith("PNG") and max(shape) > _PNG_MAX_SIDE:
        return "bad", (f"PNG of {shape[0]}x{shape[1]} pixels: a side over libpng's limit of {_PNG_MAX_SIDE:,} "
                       f"(DALI's decoder refuses it)")
    if detail.startswith("PNG"):
        why, trailer = _png_chunk_error(path)
        if why in (_PNG_HIDDEN_DEFAULT, _PNG_NARROW_FIRST_FRAME):   # not "DALI refuses it"
            return "bad", f"PNG {why}"
        if why:
            return "bad", f"PNG {why} (libpng, DALI's decoder, refuses it; PIL would decode it)"
        try:
            if trailer is not None:   # most PNGs end with IEND right after their image data
                _png_trailer_check(path, trailer)
        except Exception as exc:  # as open: PIL raises many exception types for corrupt chunks
            return "bad", f"PNG rejected by PIL: {describe_error(exc)} (after the image data)"
        why = _png_exif_error(path)
        if why:
            return "bad", f"PNG {why}"
        if verdict == "suspect":
            # verify() read through IEND, and the chunk walk found IEND whole: over 1 KiB
            # after it is no truncation (the suspect was decoded whole by PIL in DALI's
            # pre-check, 370 ms for a 12 MP PNG, before DALI decoded it again)
            return "ok", "PNG"
    return verdict, detail


# a JPEG up to this size is read whole by the pre-check's fast path (_validate_plain_jpeg)
_READ_WHOLE = 1 << 20


def _validate_plain_jpeg(path: str) -> tuple[str, str] | None:
    """:func:`validate_image_file` of a JPEG of up to 1 MiB whose end marker ends it and that
    PIL opens, from one read of the file: the cheap check's head and tail, PIL's open (of
    the bytes read; ``verify()`` does nothing for a JPEG) and `_jpeg_marker_walk`, in that
    order, with the same verdicts and words.  None for any other file, and where PIL's open
    fails (its words name the path): the caller checks it the long way.  Opening the file
    three times (check_image_file, PIL, the marker walk) cost the DALI loader's one
    pre-check thread ~60-90 us per 64-160 px JPEG, this ~40-55 us."""
    import io

    from PIL import Image

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if not 0 < size <= _READ_WHOLE:
                return None
            data = fh.read(size + 1)
    except OSError:
        return None
    if len(data) != size or not data.startswith(_JPEG_MAGIC) or \
            not data[-_TAIL_BYTES:].rstrip(b"\0").endswith(_JPEG_EOI):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "PNG")) as im:
            im.verify()
    except Exception:  # PIL raises many exception types for corrupt files
        return None
    why = _jpeg_marker_reason(_jpeg_marker_walk(data))
    return ("bad", why) if why else ("ok", "JPEG")


def _jpeg_marker_reason(why: str | None) -> str | None:
    """The bad-file reason for what `_jpeg_marker_error` found (None: nothing), one wording
    for every check that walks the markers."""
    if why == _JPEG_CMYK_NO_ADOBE:
        return f"JPEG {why}"
    return f"JPEG {why} (DALI's decoder refuses it; PIL would decode it)" if why else None


def _png_trailer_check(path: str, trailer: int) -> None:
    """Raise what PIL raises on the chunks after a PNG's image data, from byte ``trailer``
    (the first of them, found by `_png_chunk_error`'s scan), which it reads only when it
    decodes (``load_end``; ``verify()`` checks their CRCs only): a malformed ancillary chunk
    there (a truncated pHYs, zTXt text over PIL's limit) failed the torch loader's decode
    while DALI decoded the image, and before the image data it fails PIL's open, bad for
    both.  PIL's own chunk handlers, called as ``load_end`` calls them."""
    from PIL import Image

    try:
        _replay_png_load_end(path, trailer)
    except (AttributeError, TypeError):
        # PIL's internals (im.png, ChunkStream.call, _safe_read) moved in another Pillow:
        # decode the whole image instead, slower and always what the torch loader will see,
        # rather than call every PNG with a chunk after its image data bad
        with Image.open(path, formats=("PNG",)) as im:
            im.load()


def _replay_png_load_end(path: str, trailer: int) -> None:
    """PIL's ``PngImageFile.load_end`` from byte ``trailer`` on, without decoding the pixels
    (Pillow 10-13's internals)."""
    import struct

    from PIL import Image, ImageFile

    with Image.open(path, formats=("PNG",)) as im:
        png = im.png
        if png is None:
            return
        im.fp.seek(trailer)
        while True:   # PngImageFile.load_end's loop
            try:
                cid, pos, length = png.read()
            except (struct.error, SyntaxError):
                return
            # an animation's first frame ends at the next frame's fcTL (a truncated pHYs before
            # it failed the torch loader's decode of an APNG that DALI decodes)
            if cid == b"IEND" or (cid == b"fcTL" and im.is_animated):
                return
            try:
                png.call(cid, pos, length)
            except UnicodeDecodeError:
                return
            except EOFError:   # more image data
                try:
                    ImageFile._safe_read(im.fp, length - 4 if cid == b"fdAT" else length)
                except OSError:
                    if not ImageFile.LOAD_TRUNCATED_IMAGES:
                        raise
                    return
            except AttributeError:   # a chunk PIL does not read
                ImageFile._safe_read(im.fp, length)
            im.fp.read(4)   # CRC


# DALI's decoder gives such a file all black and no error (measured with DALI 2.4.0's CPU
# pipeline; with the Adobe marker both decode it alike)
_JPEG_CMYK_NO_ADOBE = ("of 4 components (CMYK) without an Adobe APP14 marker (DALI decodes it all black, PIL decodes "
                       "it)")


def _jpeg_marker_error(path: str) -> str | None:
    """What DALI's decoder (nvImageCodec's JPEG parser) refuses in a JPEG's markers before
    its scan that PIL decodes without a word: where a marker belongs, a byte other than
    0xFF (stray bytes, which PIL and libjpeg skip) or the non-marker 0xFF00, a segment
    length under 2, or no scan where the walk ends (PIL's open found one); and a frame of 4
    components without Adobe's APP14 marker, which it decodes black (``_JPEG_CMYK_NO_ADOBE``,
    returned as such: not refused).  The parser reads a length after every marker but SOS,
    as this walk does (a restart marker among the headers, which PIL skips, throws it off);
    fill bytes (0xFF runs) are fine.  Maps
    the file and reads the bytes at the markers only, skipping the segments' data (reading
    all of it into one growing buffer cost 1.2 s for a JPEG with 16 MB of APP segments,
    quadratic, and its size in memory); :func:`_jpeg_marker_walk` walks them."""
    import mmap

    try:
        with open(path, "rb") as fh:
            try:
                data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:   # an empty file (or one mmap refuses): its bytes
                return _jpeg_marker_walk(fh.read())
            with data:
                return _jpeg_marker_walk(data)
    except OSError:
        return None   # unreadable now: the loaders' decode says so


_PAST_END = "whose marker segments run past the end of the file before its scan"


def _jpeg_marker_walk(data) -> str | None:
    """`_jpeg_marker_error` of a JPEG's bytes (bytes or an mmap), in its words."""
    n = len(data)
    at = 2   # after SOI
    adobe, components = False, None
    while True:
        k = at + 1
        if k >= n:
            return _PAST_END
        first = data[at]
        while k < n and data[k] == 0xFF:   # fill bytes
            k += 1
        if k >= n:
            return _PAST_END
        marker = data[k]
        if first != 0xFF or marker == 0x00:
            return f"with stray bytes where a marker belongs (byte {at}: {first:02x} {marker:02x})"
        if marker == 0xDA:   # SOS: the scan follows
            return _JPEG_CMYK_NO_ADOBE if components == 4 and not adobe else None
        if k + 2 >= n:
            return _PAST_END
        length = data[k + 1] << 8 | data[k + 2]
        if length < 2:
            return f"with a marker segment of length {length} (byte {at}; 2 or more expected)"
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # a frame header (SOFn)
            components = data[k + 8] if k + 8 < n else None   # after length, precision, height and width
        elif marker == 0xEE and length >= 7:   # APP14: "Adobe" says how 4 components are coded
            adobe = data[k + 3:k + 8] == b"Adobe"
        at = k + 1 + length


# the next marker in entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart
# marker nor a fill byte (0xFF; the marker is then found at the last 0xFF).  No "\xff+":
# that pattern scanned 10 MB in 250 ms, this one in 10 ms
_JPEG_NEXT_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")


def _jpeg_ends_after_its_scans(path: str) -> bool:
    """Whether a JPEG's end marker (EOI) follows its scans, found by walking its segments
    by their lengths and its scans' data for the next marker (so an EOI inside an EXIF
    thumbnail or a table does not count), and its scans are each there once: a sequential
    JPEG's scans carry each component once, a progressive JPEG's scan headers differ (data
    spliced in, such as a second scan of a baseline JPEG, fails PIL's decode and not DALI's:
    a full decode decided these, and still does).  False where the walk cannot go on (a file
    cut short, a broken segment): a full decode decides then."""
    import mmap

    progressive, components, headers = False, set(), set()
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = 2   # after SOI
            while True:
                hit = _JPEG_NEXT_MARKER.search(data, at)
                if hit is None:
                    return False
                code, at = hit.group(1)[0], hit.end()
                if code == 0xD9:
                    return True
                if code == 0xD8:   # another image's start before this one's end: a cut scan
                    return False
                if code == 0x01:   # TEM, a marker without a segment
                    continue
                if at + 2 > len(data) or (data[at] << 8 | data[at + 1]) < 2:
                    return False
                length = data[at] << 8 | data[at + 1]
                if code in (0xC2, 0xC6, 0xCA, 0xCE):   # progressive frames
                    progressive = True
                elif code == 0xDA:
                    header = bytes(data[at:at + length])
                    scan = set(header[3:3 + 2 * header[2:3][0]:2]) if len(header) > 2 else set()
                    if header in headers or (not progressive and scan & components):
                        return False
                    headers.add(header)
                    components |= scan
                at += length
    except (OSError, ValueError, IndexError):
        return False   # unreadable now: the loaders' decode says so


_PNG_HIDDEN_DEFAULT = ("animation whose default image is not its first frame (DALI decodes the first frame, PIL "
                       "the default image)")
_PNG_NARROW_FIRST_FRAME = ("animation whose first frame, its default image, is narrower than the image (PIL cannot "
                           "decode it, DALI decodes it)")


# chunks OpenCV's PNG reader (in DALI's decoder) reads whatever their size; others must be
# under its PNG_USER_CHUNK_MALLOC_MAX of 8,000,000 bytes, with the chunk's 12 framing bytes
_OPENCV_ANY_SIZE = (b"fdAT", b"IDAT", b"IEND", b"PLTE", b"tEXt", b"tRNS", b"IHDR", b"acTL", b"fcTL", b"bKGD")


def _opencv_chunk_error(ctype: bytes, length: int) -> str | None:
    """What OpenCV's PNG chunk reader (``PngDecoder::read_chunk``, in DALI's decoder) refuses
    in a chunk's type and length alone, PIL decoding the image (measured, DALI 2.4)."""
    if ctype == b"bKGD" and length not in (1, 2, 6):
        return f"with a bKGD chunk of {length} bytes (1, 2 or 6 expected)"
    if ctype == b"fcTL" and length != 26:
        return f"with an fcTL chunk of {length} bytes (26 expected)"
    if ctype == b"acTL" and length != 8:
        return f"with an acTL chunk of {length} bytes (8 expected)"
    if ctype not in _OPENCV_ANY_SIZE and length + 12 > 8_000_000:
        return (f"with a {ctype.decode('latin-1')!r} chunk of {length:,} bytes where DALI's decoder reads at most "
                f"7,999,988")
    return None


def _png_chunk_error(path: str) -> tuple[str | None, int | None]:
    """(what is wrong, where the chunks after the image data start, or None): what DALI's decoder (nvImageCodec's PNG parser, then libpng) refuses in a PNG's chunk
    sequence that PIL decodes without a word: a critical chunk it does not know (one whose
    type starts with a capital letter, not IHDR/PLTE/IDAT/IEND), a chunk type that is not
    four ASCII letters with a capital third one, an IHDR that is not the first chunk, is
    not 13 bytes long, comes twice or names a compression method other than 0, in a
    palette image no PLTE before the image data, a second PLTE, or one whose length is not
    a positive multiple of 3, and an IEND whose data or CRC the file cuts short (PIL reads
    no further than IEND's type).  And an animation (APNG) of several frames whose image
    data is a default image outside the animation (no fcTL before it): DALI decodes the
    first frame, PIL the default image (measured, DALI 2.4; one frame: both the default
    image), and an acTL chunk before the image data that DALI's decoder refuses (not 8
    bytes long, or 0 frames; PIL takes the default image).  Of several acTL chunks DALI's
    decoder takes the last one's frame count (PIL calls the animation invalid).  And what
    OpenCV's chunk reader in DALI's decoder refuses before the image data, and in an
    animation up to its first frame's end: see `_opencv_chunk_error`, and an fcTL chunk with
    a dispose op over 2 or a blend op over 1, or whose frame lies outside the image; and an
    animation whose first frame is narrower than the image (PIL cannot decode it).  Reads
    the chunk headers, IHDR, acTL and those fcTL only (PIL's ``verify()`` has already read
    every chunk)."""
    ihdr = plte = palette = idat = fctl = first_frame_read = False
    trailer = frames = None
    width = height = 0
    first_width = None   # of the first fcTL before the image data
    try:
        with open(path, "rb") as fh:
            fh.seek(len(_PNG_MAGIC))
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return None, trailer   # cut short: the end-marker check and PIL judge that
                length, ctype = int.from_bytes(head[:4], "big"), head[4:]
                name = ctype.decode("latin-1")
                if not ctype.isalpha() or ctype[2] & 0x20:
                    return f"with an invalid chunk type {name!r}", None   # not letters, or the reserved bit set
                if not ihdr and ctype != b"IHDR":
                    return f"with a {name!r} chunk before IHDR (IHDR must come first)", None
                if ctype == b"IDAT":
                    if not idat and (frames or 0) > 1 and not fctl:
                        return _PNG_HIDDEN_DEFAULT, None
                    # an animation's first frame must be the whole image: PIL decodes a narrower
                    # one to a data-stream error, DALI into the image's corner
                    if not idat and (frames or 0) > 1 and first_width is not None and first_width != width:
                        return _PNG_NARROW_FIRST_FRAME, None
                    idat = True
                elif idat and trailer is None and ctype != b"IEND":
                    trailer = fh.tell() - 8
                # OpenCV's chunk reader in DALI's decoder reads the chunks before the image data,
                # and in an animation those up to its first frame's end (the next fcTL)
                if not idat or ((frames or 0) > 1 and not first_frame_read):
                    why = _opencv_chunk_error(ctype, length)
                    if why:
                        return why, None
                    if ctype == b"fcTL":
                        data, length = fh.read(26), 0
                        if len(data) < 26:
                            return None, trailer   # cut short: PIL judges that
                        if data[24] > 2 or data[25] > 1:
                            return (f"with an fcTL chunk of dispose op {data[24]} and blend op {data[25]} (at most 2 "
                                    f"and 1 expected)"), None
                        if not idat and first_width is None:
                            first_width = int.from_bytes(data[4:8], "big")
                        if idat:   # the next frame's, read while the first one is decoded
                            first_frame_read = True
                            w, h, x, y = (int.from_bytes(data[k:k + 4], "big") for k in (4, 8, 12, 16))
                            if x + w > width or y + h > height:
                                return "with an fcTL chunk of a frame outside the image", None
                if ctype == b"IHDR":
                    if ihdr:
                        return "with a second IHDR chunk", None
                    if length != 13:
                        return f"with an IHDR chunk of {length} bytes (13 expected)", None
                    data = fh.read(13)
                    width, height = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
                    if data[10:11] not in (b"\x00", b""):
                        return f"with compression method {data[10]} in IHDR (only 0 is defined)", None
                    ihdr, palette, length = True, data[9:10] == b"\x03", 0   # colour type 3
                elif ctype == b"PLTE" and palette:
                    if plte:
                        return "palette image with a second PLTE chunk", None
                    if length == 0 or length % 3:
                        return (f"palette image with a PLTE chunk of {length} bytes (a positive multiple of 3 "
                                f"expected)"), None
                    plte = True
                elif ctype == b"IDAT" and palette and not plte:
                    return "palette image without a PLTE chunk before its image data", None
                elif ctype in (b"acTL", b"fcTL") and not idat:
                    if ctype == b"acTL":   # DALI's decoder takes the last one's num_frames
                        if length != 8:
                            return f"with an acTL chunk of {length} bytes (8 expected)", None
                        frames, length = int.from_bytes(fh.read(4), "big"), length - 4
                        if frames == 0:
                            return "with an acTL chunk of 0 frames", None
                    fctl = fctl or ctype == b"fcTL"
                elif ctype == b"IEND":
                    if fh.tell() + length + 4 > os.fstat(fh.fileno()).st_size:
                        return "with its IEND chunk cut short (the file ends inside its data or CRC)", None
                    return None, trailer
                elif not ctype[0] & 0x20 and ctype not in _PNG_CRITICAL:
                    return f"with an unknown critical chunk {name!r}", None
                fh.seek(length + 4, os.SEEK_CUR)   # data and CRC
    except OSError:
        return None, None   # unreadable now: the loaders' decode says so


def _to_rgb_or_l(im, channels: int):
    if im.mode in _WIDE_GRAY_MODES:
        # 16-bit grey PNGs open as I;16 / I: PIL's convert clips them to 255 (all white);
        # scale to 8 bits first, round(v / 257) as DALI's decoder does
        from PIL import Image
        v = np.asarray(im).astype(np.int64)
        im = Image.fromarray(np.clip((v + 128) // 257, 0, 255).astype(np.uint8), mode="L")
    if channels == 3:
        return im if im.mode == "RGB" else im.convert("RGB")   # convert to its own mode copies
    if im.mode == "L":
        return im
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint32)
    wr, wg, wb = GRAY_WEIGHTS
    gray = (rgb[..., 0] * wr + rgb[..., 1] * wg + rgb[..., 2] * wb + (1 << (GRAY_SHIFT - 1))) >> GRAY_SHIFT
    from PIL import Image
    return Image.fromarray(gray.astype(np.uint8), mode="L")


# EXIF orientation -> PIL transpose (PIL.ImageOps.exif_transpose's table)
_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
           7: "TRANSVERSE", 8: "ROTATE_90"}


# IFD0 tags DALI's EXIF reader (nvImageCodec's copy of OpenCV's ExifReader) reads, whose
# data it bounds-checks: text, and unsigned rationals (how many)
_EXIF_TEXT = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x8298)
_EXIF_RATIONALS = {0x011A: 1, 0x011B: 1, 0x013E: 2, 0x013F: 6, 0x0211: 3, 0x0214: 6}


def _exif_orientation(im, path: str | None = None) -> int:
    """The EXIF orientation of a decoded image as DALI's decoder reads it, so that both
    loaders turn the same images.  Not PIL's ``getexif()``, which also takes XMP's
    ``tiff:Orientation`` and a PNG's "Raw profile type exif" text (DALI ignores both: the
    torch loader turned such images 90 degrees from DALI's) and raised on a malformed PNG
    eXIf chunk (the torch loader marked bad an image DALI decodes).  DALI's reader takes
    the first orientation entry of IFD0 as 16 bits whatever its type (a LONG 6 is 6 in
    little-endian EXIF, 0 in big-endian), and gives up on an entry whose data lies outside
    the block: in a JPEG it then ignores the orientation (measured, DALI 2.4; in a PNG it
    corrupts its memory, and such a PNG is bad: `_png_exif_error`).  Values other than 1-8:
    no turn.

    Nor PIL's one EXIF block where a file has several (measured, DALI 2.4): a JPEG's Exif
    APP1 segments are read one by one (PIL joins them into one block): the first
    orientation read in any of them counts once a segment read whole has one, and the last
    such segment's own orientation, if it is not 2-8, undoes the turn; a PNG's
    first eXIf chunk that libpng keeps (4 bytes or more, starting with a TIFF header)
    counts and later ones do not (PIL keeps the last; ``path`` is read for it), and none in
    an animation (see `_png_exif_chunks`)."""
    if getattr(im, "format", None) == "PNG":
        # PIL's decode of an animation's first frame reads no eXIf after it, DALI's of a still
        # outside a one-frame animation does (the torch loader did not turn such an image)
        if ("exif" not in im.info and not getattr(im, "is_animated", False)) or path is None:
            return 1
        data = _png_exif_chunks(path)[0]
        found = _ifd0_orientation(data)[0] if data is not None else None
        return found if found is not None else 1
    first, turn = None, 1
    for app, seg in getattr(im, "applist", None) or []:
        if app != "APP1" or not seg.startswith(b"Exif\x00\x00"):
            continue
        found, whole = _ifd0_orientation(seg[6:])
        first = found if first is None else first
        if whole and found is not None:
            # every segment counts, not the first read whole only: a later one of 1 (or 0, 9)
            # undid DALI's turn of 6 then 1, which the torch loader turned (measured, DALI 2.4)
            turn = first if 2 <= found <= 8 else 1
    return turn


def _ifd0_orientation(d: bytes) -> tuple[int | None, bool]:
    """(the first orientation entry of EXIF block ``d``'s IFD0 or None, whether DALI's
    reader reads IFD0 whole), read as DALI's reader reads it (see `_exif_orientation`)."""
    order = "little" if d[:1] == b"I" and d[1:2] in (b"I", b"") else "big"

    def u(o: int, n: int) -> int:
        if o + n > len(d):
            raise IndexError(o)
        return int.from_bytes(d[o:o + n], order)

    found = None
    try:
        if u(2, 2) != 0x2A:
            return None, False
        off = u(4, 4)
        count, off = u(off, 2), off + 2
        for _ in range(count):
            tag = u(off, 2)
            if tag in _EXIF_TEXT:
                size = u(off + 4, 4)
                if (8 if size <= 4 else u(off + 8, 4)) + size > len(d):
                    raise IndexError(off)
            elif tag in _EXIF_RATIONALS:
                at = u(off + 8, 4)
                u(at + 8 * _EXIF_RATIONALS[tag] - 4, 4)
            elif tag in (0x0112, 0x0128, 0x0213):   # orientation, resolution unit, YCbCr positioning
                value = u(off + 8, 2)
                if tag == 0x0112 and found is None:
                    found = value
            off += 12
    except IndexError:
        return found, False
    return found, True


def _png_exif_error(path: str) -> str | None:
    """Why DALI's decoder cannot be given a PNG for its EXIF block, or None (measured, DALI
    2.4's CPU decoder, twenty-eighth session's review): an IFD0 that runs past its block (an
    entry count or an entry's data beyond it) corrupts the decoder's memory, and the
    process aborts or crashes some runs later; a first eXIf chunk that libpng drops (no TIFF
    byte order: "XM" for "MM") still turns DALI's output by its orientation 5-8 into an
    image of zero rows and pixels from nowhere.  The torch loader decodes both, so both
    loaders call them bad (a JPEG's EXIF block does neither)."""
    data, first = _png_exif_chunks(path)   # one walk over the chunks: every PNG pays it
    if data is not None:
        if not _ifd0_orientation(data)[1]:
            return "with an EXIF block (eXIf) whose first directory runs past its end (DALI's decoder corrupts memory on it)"
        return None
    if first is not None and (_ifd0_orientation(first)[0] or 0) in range(5, 9):
        return ("with an EXIF block (eXIf) libpng drops (no TIFF byte order) whose orientation DALI's decoder still "
                "applies: its output would not be the image")
    return None


def _png_exif_chunks(path: str) -> tuple[bytes | None, bytes | None]:
    """(the data of the first eXIf chunk of a PNG that libpng keeps (see `_exif_orientation`),
    the first eXIf chunk of 4 bytes or more whatever it starts with: libpng drops one without
    "II*\\0" or "MM\\0*"); (None, None) for an animation: DALI's decoder ignores the EXIF
    orientation of a PNG whose last acTL chunk before its image data counts more than one frame
    (measured, DALI 2.4; PIL's turned the first frame)."""
    kept, first, frames, idat = None, None, 1, False
    try:
        with open(path, "rb") as fh:
            fh.seek(len(_PNG_MAGIC))
            while True:
                head = fh.read(8)
                if len(head) < 8 or head[4:] == b"IEND":
                    return kept, first
                length = int.from_bytes(head[:4], "big")
                if head[4:] == b"IDAT" and not idat:
                    if frames > 1:
                        return None, None
                    idat = True
                    if kept is not None:
                        return kept, first
                if head[4:] == b"acTL" and not idat and length >= 4:
                    frames = int.from_bytes(fh.read(4), "big")
                    fh.seek(length, os.SEEK_CUR)
                elif head[4:] == b"eXIf" and length >= 4 and kept is None:
                    data = fh.read(length)
                    first = data if first is None else first
                    if data[:4] in (b"II*\x00", b"MM\x00*"):
                        kept = data
                        if idat:
                            return kept, first
                    fh.seek(4, os.SEEK_CUR)
                else:
                    fh.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return None, None


def _edge_clamped_window(im, box: tuple, reach: int):
    """(image, box in its pixels): the source around ``box``, ``reach`` pixels beyond it on each
    side, with the image's edge pixels repeated where that leaves the image.  Near the border
    PIL's filter renormalises its weights over the pixels inside the image where DALI's
    clamps to the edge pixel: a 1-pixel white frame on a 1000 px image came out 59/255 apart
    at size 16 (7.9/255 on average).  Resampled from this window, the loaders agree within
    rounding there too; ``reach``: how far the filter reaches from a sample, in source pixels."""
    from PIL import Image

    w, h = im.size
    x0, y0 = math.floor(box[0]) - reach, math.floor(box[1]) - reach
    x1, y1 = math.ceil(box[2]) + reach, math.ceil(box[3]) + reach
    window = im.crop((max(0, x0), max(0, y0), min(w, x1), min(h, y1)))   # within the image: PIL's pixel limit
    ww, wh = x1 - x0, y1 - y0
    left, top, right, bottom = max(0, -x0), max(0, -y0), min(ww, w - x0), min(wh, h - y0)
    if (left, top, right, bottom) == (0, 0, ww, wh):
        return window, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    inner, window = window, Image.new(im.mode, (ww, wh))
    window.paste(inner, (left, top))
    # each band outside the image is its edge row / column stretched (NEAREST: repeated);
    # rows first, then whole columns, which fills the corners with the corner pixels.  In
    # PIL: the numpy round trip (asarray, pad, fromarray) took as long as the resample
    if top:
        window.paste(window.crop((left, top, right, top + 1)).resize((right - left, top), Image.NEAREST), (left, 0))
    if bottom < wh:
        window.paste(window.crop((left, bottom - 1, right, bottom)).resize((right - left, wh - bottom), Image.NEAREST),
                     (left, bottom))
    if left:
        window.paste(window.crop((left, 0, left + 1, wh)).resize((left, wh), Image.NEAREST), (0, 0))
    if right < ww:
        window.paste(window.crop((right - 1, 0, right, wh)).resize((ww - right, wh), Image.NEAREST), (right, 0))
    return window, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)


def load_image_uint8(path: str, spec: PreprocessSpec) -> torch.Tensor:
    """Decode and preprocess one file to uint8 (C, size, size); raises on a bad file."""
    from PIL import Image

    with Image.open(path) as im:
        return _preprocess_opened(im, path, spec)


def _preprocess_opened(im, path: str, spec: PreprocessSpec) -> torch.Tensor:
    """:func:`load_image_uint8` of an image PIL has opened from ``path`` (not yet loaded)."""
    from PIL import Image

    im.load()
    method = _ORIENT.get(_exif_orientation(im, path))
    if method is not None:
        im = im.transpose(Image.Transpose[method])
    im = _to_rgb_or_l(im, spec.channels)
    h, w = im.height, im.width
    nh, nw, top, left = crop_geometry(h, w, spec.size)
    # resample only the crop window (as DALI's ROI does): resizing the whole image first
    # costs size^2 * w / h for a long strip (a 1x20000 PNG at 224: 4.5 GB, 30 s)
    sy, sx = h / nh, w / nw
    box = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
    im, box = _edge_clamped_window(im, box, math.ceil(max(sx, sy, 1.0)) + 1)
    im = im.resize((spec.size, spec.size), Image.BILINEAR, reducing_gap=None, box=box)
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())   # one copy, in C order


def describe_error(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"


def checked_load_uint8(path: str, spec: PreprocessSpec) -> tuple[torch.Tensor | None, str]:
    """The torch loader's per-file step: (uint8 image, "") or (None, reason).

    The reasons are the DALI loader's (``loader_dali._precheck``) for the same file,
    except for a file that passes the pre-check and fails to decode (damaged image data):
    both loaders mark it bad, DALI with its decoder's words."""
    verdict, detail = check_image_file(path)
    if verdict == "ok" and detail == "JPEG":
        done = _checked_load_jpeg(path, spec)
        if done is not None:
            return done
    if verdict != "bad":
        verdict, detail = validate_image_file(path, (verdict, detail))
    if verdict == "bad":
        return None, detail
    try:
        return load_image_uint8(path, spec), ""
    except Exception as exc:  # PIL raises many exception types for corrupt files
        reason = describe_error(exc)
        return None, f"{detail}: {reason}" if verdict == "suspect" else reason


def _checked_load_jpeg(path: str, spec: PreprocessSpec) -> tuple[torch.Tensor | None, str] | None:
    """:func:`checked_load_uint8` of a JPEG that :func:`check_image_file` passed, in one PIL
    open for :func:`validate_image_file`'s checks and the decode (the second open cost a
    64-160 px JPEG ~35 us of its ~0.45 ms).  What validate_image_file checks of such a file is
    PIL's open (``verify()`` does nothing for a JPEG) and `_jpeg_marker_error`, in that order,
    here in its words.  None: opened by a plugin other than JPEG (an MPO), the caller takes
    the two opens."""
    from PIL import Image, ImageFile

    try:
        im = Image.open(path, formats=("JPEG", "PNG"))
    except Exception as exc:  # PIL raises many exception types for corrupt files
        return None, f"JPEG rejected by PIL: {describe_error(exc)}"
    with im:
        if im.format != "JPEG" or type(im).verify is not ImageFile.ImageFile.verify:
            return None
        why = _jpeg_marker_reason(_jpeg_marker_error(path))
        if why:
            return None, why
        try:
            return _preprocess_opened(im, path, spec), ""
        except Exception as exc:  # PIL raises many exception types for corrupt files
            return None, describe_error(exc)


DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def output_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or its name; uint8 means 0..255, floats mean [0, 1]."""
    if isinstance(dtype, str):
        key = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
               "bf16": "bfloat16"}.get(dtype, dtype)
        if key not in DTYPES:
            raise ValueError(f"output dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[key]
    if dtype not in DTYPES.values():
        raise ValueError(f"output dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


def uint8_to(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 0..255 -> ``dtype`` (uint8 unchanged; floats in [0, 1])."""
    if dtype == torch.uint8:
        return images
    return images.to(torch.float32).div_(255.0).to(dtype)
