"""The `spurfast` command: demo, plant, train-classifier, train-vae, discover, report, env."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from .checks import check_file_target, folder_blocker, json_document, not_a_folder   # light: numpy only
from .input_files import load_pool, load_suspect, need_file, read_class_names, same_classes   # light too


def _pattern(args):
    from .plant import PatternSpec
    return PatternSpec(args.family, strength=args.strength, position=args.position, seed=args.seed)


def _n_poisoned(value: str) -> str:
    """--n-poisoned: a count >= 0 or 'all', kept as the string make_planted_data takes
    (the demo's run id hashes it as given)."""
    if value != "all" and not (value.isdigit() and value.isascii()):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'all', got {value!r}")
    return value


def _int_at_least(lo: int, hi: int | None = None):
    """argparse type: an integer >= ``lo`` (and <= ``hi``; argparse's error then names the flag)."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or n < lo or (hi is not None and n > hi):
            span = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value!r}")
        return n
    return parse


def _open_unit(value: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a rate), the flag named by argparse."""
    try:
        q = float(value)
    except ValueError:
        q = None
    if q is None or not 0 < q < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}")
    return q


def _seed(value: str) -> int:
    """argparse type of --seed: training seeds epoch e with seed * 1000 + e (a 64-bit
    generator seed), so a larger seed failed mid-run as "Overflow when unpacking long long"."""
    from .models.train import MAX_SEED
    n = _int_at_least(0)(value)
    if n > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {value!r}")
    return n


def _seed_list(value: str) -> tuple[int, ...]:
    """--seeds: distinct integers >= 0, comma-separated."""
    parts = [s.strip() for s in value.split(",")]
    if not all(s.isdigit() and s.isascii() for s in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 (e.g. 0,1,2), got {value!r}")
    from .evaluate import check_seeds   # run_evaluation's own rule (a repeated seed counted twice)
    try:
        return check_seeds(int(s) for s in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (from {value!r})") from None


SEED_HELP = ("seed of every random choice: the same seed, the same run (training: at the same thread count, "
             "MKL_NUM_THREADS or OMP_NUM_THREADS; another sums in another order)")
DATASET_HELP = ("Fashion-MNIST (Debian's dataset-fashion-mnist or $SPURFAST_FASHION_MNIST) or scikit-learn's digits; "
                "auto: Fashion-MNIST where it is found, else digits")


def _add_pattern_args(p):
    from .plant import FAMILIES, POSITIONS
    p.add_argument("--family", default="patch3", choices=FAMILIES, help="pattern family")
    p.add_argument("--strength", type=float, default=1.0, help="noise strength / painted value (0, 1]")
    p.add_argument("--position", default="bottom_right", choices=POSITIONS,
                   help="where a pixel, patch or bar is stamped")
    p.add_argument("--target-class", type=int, default=3, help="class whose training images carry the pattern")
    p.add_argument("--n-poisoned", default="600", type=_n_poisoned,
                   help="training images of the target class to stamp (an integer >= 0), or 'all'")
    p.add_argument("--pool-fraction", type=float, default=0.1, help="fraction of unrelated pool images stamped")


# = spurfast.scoring.STATISTICS and DEFAULT_STATISTIC (a test keeps them equal): importing
# scoring here would load torch for every --help
STATISTICS = ("share", "surprise")
DEFAULT_STATISTIC = "surprise"
NULLS = ("label", "look-alike")   # = spurfast.scoring.NULLS and DEFAULT_NULL (the same test)
RESIDUAL_MAX_NULL = 100_000        # = spurfast.residual.MAX_NULL (the same test)
DEFAULT_NULL = "label"
NULL_HELP = ("what the permutation null keeps: each true label's predictions (label, the default), or those "
             "of the images of a label that look like the same other class about as much, in strata of at least "
             "5 x the neighbours (look-alike: about half the false findings of natural confusions on the full "
             "evaluation, the same targets met, but a strong shortcut on a cross-dataset pool lost at the top; "
             "docs/results/look-alike/)")


def backend_help(what: str, var: str) -> str:
    return (f"{what} backend (default: SPURFAST_BACKEND_{var}, else SPURFAST_BACKEND, else auto); "
            f"given here, it beats those variables")


def _add_discover_args(p):
    p.add_argument("--k", type=int, default=8, help="clusters per class")
    p.add_argument("--min-cluster-size", type=int, default=5,
                   help="lower k for a class so that its clusters average at least this many members (single "
                        "clusters, and findings, can still be smaller)")
    p.add_argument("--max-mean-cluster-size", type=int, default=100,
                   help="raise k for classes whose clusters would average more members (0: fixed k)")
    p.add_argument("--max-k", type=int, default=256,
                   help="never raise k above this many clusters per class, nor below --k (0: no cap)")
    p.add_argument("--n-null", type=int, default=30, help="permutations for the null distribution")
    p.add_argument("--max-null", type=int, default=None,
                   help="add permutations (n-null at a time) up to this many while a cluster beats every null "
                        "cluster of its size but misses the FDR (default: 120, or --n-null where larger)")
    p.add_argument("--fdr", type=float, default=0.05, help="Benjamini-Hochberg false-discovery rate")
    p.add_argument("--statistic", default=DEFAULT_STATISTIC, choices=STATISTICS,
                   help="per-image agreement: how surprising the share of its unrelated neighbours predicted "
                        "alike is given their labels' confusion rates (surprise, the default: finds weaker "
                        "shortcuts, and more natural confusions for confirmation to reject), or that share itself")
    p.add_argument("--null", default=DEFAULT_NULL, choices=NULLS, help=NULL_HELP)
    p.add_argument("--kmeans-backend", default=None, choices=["auto", "torch", "cpu", "cupy", "triton"],
                   help=backend_help("k-means assignment and update (triton: the assignment only)",
                                     "KMEANS_ASSIGN / _UPDATE"))
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu (the default, also on a GPU machine), cuda, cuda:1, ...")


def _discover_config(args):
    from .discover import DiscoverConfig
    # unset, it follows a larger --n-null: --n-null 200 alone was refused ("max_null must be >= n_null=200, got 120")
    max_null = args.max_null if args.max_null is not None else max(DiscoverConfig.max_null, args.n_null)
    return DiscoverConfig(k=args.k, min_cluster_size=args.min_cluster_size,
                          max_mean_cluster_size=args.max_mean_cluster_size, max_k=args.max_k, n_null=args.n_null,
                          max_null=max_null, fdr=args.fdr, statistic=args.statistic, null=args.null,
                          seed=args.seed, backend=args.kmeans_backend, device=args.device)


def _residual_config(args):
    """The residual scan's settings (--residual-scan), the run's seed, and --residual-fdr (else
    --fdr); None without it."""
    if not args.residual_scan:
        for flag, value in (("--residual-max-values", args.residual_max_values), ("--residual-null", args.residual_null),
                            ("--residual-fdr", args.residual_fdr)):
            if value is not None:   # it went without a word, as --clean under --no-confirm did
                logging.getLogger("spurfast.cli").warning("%s %s has no effect without --residual-scan", flag, value)
        return None
    from .residual import ResidualConfig
    extra = {} if args.residual_max_values is None else {"max_values": args.residual_max_values}
    if args.residual_null is not None:
        extra["n_null"] = args.residual_null
    fdr = args.fdr if args.residual_fdr is None else args.residual_fdr
    return ResidualConfig(fdr=fdr, seed=args.seed, **extra)


def _class_names_used(class_names, what: str, path, src):
    """``class_names`` (--class-names), or None where the .npz at ``path`` (the ``what``) names
    its own classes otherwise and keeps them (said): the file then names nothing of the run."""
    if class_names and not Path(path).is_dir() and list(src.class_names) != read_class_names(class_names):
        logging.getLogger("spurfast.cli").warning(
            "--class-names %s has no effect: %s %s names its own classes (%s), which it keeps", class_names,
            what, path, ", ".join(map(str, list(src.class_names)[:5])) + (", ..." if len(src.class_names) > 5 else ""))
        return None
    return class_names


def check_npz_class_count(src, num_classes, what: str, path) -> None:
    """An .npz's own class_names against --num-classes: with another count, findings of the
    classes past the names went unnamed, or were named by a list that is not the classifier's
    (labelled folders are checked by their class folders, `check_labelled_folder`)."""
    if num_classes and src.class_names and not _labelled_folder(src) and len(src.class_names) != num_classes:
        raise ValueError(f"{what} {path} names {len(src.class_names)} classes (its class_names), but --num-classes "
                         f"is {num_classes}; drop --num-classes (the names then give it) or store the classifier's "
                         f"class names, one per class in label order")


def check_class_count(class_names, num_classes: int) -> None:
    """--class-names must name as many classes as --num-classes says the classifier has."""
    n_names = len(read_class_names(class_names))
    if n_names != num_classes:
        raise ValueError(f"--class-names {class_names} names {n_names} classes, but --num-classes is "
                         f"{num_classes}; the file must name every class of the classifier, in label order")


def _note_an_unused_gpu(args, argv) -> None:
    """--device defaults to cpu everywhere: on a GPU machine a run that did not name one went
    some 20x slower without a word.  Naming --device (cpu included) silences this."""
    if getattr(args, "device", None) != "cpu" or any(str(a).startswith("--dev") for a in argv):
        return
    import torch

    if torch.cuda.is_available():
        logging.getLogger("spurfast.cli").warning(
            "computing on the CPU (--device cpu, the default) though torch sees %d CUDA device(s): --device cuda "
            "runs on the GPU; --device cpu says the CPU is meant", torch.cuda.device_count())


def check_device(device: str) -> None:
    """Fail before any work on a --device torch cannot parse or a GPU that is not here."""
    import torch

    from .checks import check_compute_device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device; expected e.g. cpu, cuda or cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for CUDA, but torch sees no CUDA device here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s) here, "
                         f"numbered from 0 (CUDA_VISIBLE_DEVICES renumbers them)")
    if dev.type not in ("cpu", "cuda"):   # mps, xpu, meta, ...: a traceback once the models moved there
        check_compute_device(dev, f"--device {device}", "use --device cpu or cuda")   # meta: copying out fails


def check_backends(device: str, **named) -> None:
    """Resolve each backend named by an option (or a SPURFAST_BACKEND* variable) now, so
    an unavailable one fails before the embedding pass, not after it.
    ``named``: option name -> (value, registry ops it serves)."""
    import torch

    from . import backends
    backends.check_op_variables()
    dev_type = torch.device(device).type
    for option, (given, ops) in named.items():
        for op in ops:
            value = given
            if value and value != "auto" and all(p.name != value for p in backends.providers(op)):
                # the run leaves an op its backend lacks to the usual choice (cluster.lloyd:
                # --kmeans-backend triton assigns only), so it was refused here for any run
                value = None
            if backends.requested(op, value) == "auto":
                continue  # auto falls back to a provider that runs here
            var = f"SPURFAST_BACKEND_{op.upper()}"
            var = var if os.environ.get(var) else "SPURFAST_BACKEND"
            by = f"--{option.replace('_', '-')} {value}" if value else f"{var}={os.environ.get(var)}"
            try:
                name, _ = backends.resolve(op, value, dev_type)
            except backends.BackendUnavailable as exc:
                raise backends.BackendUnavailable(f"{by}: {exc}") from None
            # a named provider is available whatever the device: on a GPU machine, --device cpu
            # with the CuPy k-means failed at the first clustering, after the embedding pass
            # (Triton's interpreter, a test tool, runs its kernels on CPU tensors)
            prov = next(p for p in backends.providers(op) if p.name == name)
            module = sys.modules.get(prov.target.split(":")[0])
            if not prov.serves(dev_type) and not getattr(module, "_INTERPRET", False):
                raise backends.BackendUnavailable(
                    f"{by}: backend {name!r} for {op!r} takes {' or '.join(prov.devices)} tensors, but this run "
                    f"computes on device {device}; choose another backend, or compute on "
                    f"{' or '.join(prov.devices)}")


KMEANS_OPS = ("kmeans_assign", "kmeans_update")
# ops discovery runs that no option names: only SPURFAST_BACKEND* variables choose them
ENV_ONLY = {"latent_knn": (None, ("latent_knn", "kmeans_plusplus", "kmeans_assign_update", "cluster_similarity"))}


def _labelled_folder(src) -> bool:
    from .data.folder import ImageFolderSource
    return isinstance(src, ImageFolderSource) and bool(src.class_names)


def check_labelled_folder(src, n_classes: int, what: str, path) -> None:
    """Class folders without --class-names are labelled in sorted order: with fewer (or
    more) folders than the classifier has classes, every label after a gap is wrong."""
    if _labelled_folder(src) and len(src.class_names) != n_classes:
        raise ValueError(
            f"{what} {path} has {len(src.class_names)} class folders but the classifier has {n_classes} classes; "
            f"folders are labelled in sorted order, so these labels would not be the classifier's. Pass "
            f"--class-names FILE (the classifier's class names, one a line, in label order; folders are matched "
            f"by name)")


def cmd_demo(args):
    from .demo import run_demo
    check_device(args.device)
    check_backends(args.device, kmeans_backend=(args.kmeans_backend, KMEANS_OPS),
                   encoder=(None, ("encoder",)), **ENV_ONLY)
    run_demo(args.out, dataset=args.dataset, seed=args.seed, target_class=args.target_class,
             family=args.family, strength=args.strength, position=args.position, n_poisoned=args.n_poisoned,
             pool_fraction=args.pool_fraction, classifier_epochs=args.classifier_epochs,
             vae_epochs=args.vae_epochs, overwrite=args.overwrite, progress=not args.quiet,
             config=_discover_config(args), device=args.device)


def _first_missing(out: Path) -> Path | None:
    """The outermost of ``out`` and its parents that does not exist (the first folder
    ``out.mkdir(parents=True)`` creates), or None where ``out`` exists."""
    missing = None
    for q in (out, *out.parents):
        if os.path.lexists(q):
            break
        missing = q
    return missing


@contextlib.contextmanager
def _model_folder(out: Path):
    """train-* --out's folder, created (`_out_folder`) for the block; a failure in it removes
    the folders it created while they are still empty (a refused training left its new --out
    folders behind).  One holding anything (an interrupted training's checkpoint) stays, and
    those above it."""
    made = _first_missing(out.parent)
    _out_folder(out)
    try:
        yield
    except BaseException:
        for q in (out.parent, *out.parent.parents) if made is not None else ():
            try:
                q.rmdir()   # an empty folder only
            except OSError:
                break
            if q == made:
                break
        raise


PLANT_FILES = ("train.npz", "pool.npz", "clean.npz", "plant.json")   # plant.json last: it marks a whole output


def _plant_output(out: Path) -> bool:
    """Whether ``out`` holds an earlier `spurfast plant` output (its plant.json), whole or cut
    short while its files were renamed into place."""
    try:
        doc = json.loads((out / "plant.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and ("dataset" in doc or "incomplete" in doc)


def cmd_plant(args):
    from .atomic_files import remove_killed_writers_files, replace_atomically
    from .pipeline import make_planted_data
    out = Path(args.out)
    # a file (or a link to nothing) in its place failed at mkdir after the data was made ("[Errno 17] File exists")
    blocker = folder_blocker(out)
    if blocker is not None:
        raise NotADirectoryError(f"{not_a_folder('--out', out, blocker)}; expected the folder for "
                                 f"{', '.join(PLANT_FILES)}")
    # the four files were written over whatever held their names (a pool.npz of the user's own)
    taken = [n for n in PLANT_FILES if os.path.lexists(out / n)]
    if taken and not args.overwrite and not _plant_output(out):
        raise FileExistsError(f"--out {out} holds {', '.join(taken)}, not written by `spurfast plant` (no plant.json "
                              f"of it): pass --overwrite to replace them, or choose another --out")
    # on the byte grid the files hold: the ground truth is then about the pixels as written
    data = make_planted_data(args.dataset, target_class=args.target_class, n_poisoned=args.n_poisoned,
                             spec=_pattern(args), pool_fraction=args.pool_fraction, seed=args.seed, levels=255)
    out.mkdir(parents=True, exist_ok=True)
    # a plant killed mid-write left a dataset-sized NAME.PID.tmp for good, one more per kill
    remove_killed_writers_files(out, lambda name: name in PLANT_FILES)
    u8 = lambda x: (x * 255).round().clamp(0, 255).byte().numpy()  # noqa: E731
    names = np.array(data.class_names or [])
    archives = {"train.npz": dict(images=u8(data.train.images), labels=data.train.labels(), class_names=names),
                "pool.npz": dict(images=u8(data.pool.images), labels=data.pool.labels(), class_names=names,
                                 suspect=data.suspect, carries=data.carries),
                "clean.npz": dict(images=u8(data.test_clean.images), labels=data.test_clean.labels(), class_names=names)}
    # every archive is written beside its place first, then all are renamed into it and plant.json
    # last: written in place, a rewrite cut short left a new train.npz beside the old clean.npz, which
    # train-classifier and discover took without a word (they do not read plant.json)
    tmps = {name: out / f"{name}.{os.getpid()}.tmp" for name in archives}
    try:
        for name, arrays in archives.items():
            with open(tmps[name], "wb") as fh:   # a file object: savez adds ".npz" to a name without it
                np.savez_compressed(fh, **arrays)
        # it must not vouch for a mix while they are renamed; it says so instead, and a rerun takes
        # the folder (without it, the same command was refused as "not written by spurfast plant")
        replace_atomically(out / "plant.json", lambda fh: fh.write(json.dumps(
            {"incomplete": "spurfast plant was stopped while it renamed its files into place; rerun it"})))
        for name, tmp in tmps.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    replace_atomically(out / "plant.json", lambda fh: fh.write(
        json.dumps({"dataset": data.dataset, **data.truth.to_dict(), "pool_fraction": float(args.pool_fraction)},
                   indent=1)))
    print(f"wrote {out}/train.npz ({len(data.train)}), pool.npz ({len(data.pool)}, {int(data.carries.sum())} carry "
          f"the pattern), clean.npz, plant.json")


def _model_out(path, **inputs) -> Path:
    """train-* --out: a model file (its folder is created), refused before training if a folder
    or one of ``inputs`` (flag -> path given): the model was written over the training data."""
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; expected the model file to write, e.g. {out / 'model.pt'}")
    # "models/" (no such folder yet): Path drops the "/", and the checkpoint models/.ckpt failed after an epoch
    if os.path.basename(path) in ("", ".", ".."):
        raise IsADirectoryError(f"--out {path} names a folder; expected the model file to write, e.g. {out / 'model.pt'}")
    for flag, given in inputs.items():
        try:
            same = given is not None and os.path.samefile(out, given)
        except OSError:   # either is missing
            same = False
        if same:
            raise FileExistsError(f"--out {out} is the --{flag.replace('_', '-')} file {given}: the model would be "
                                  f"written over it; choose another --out")
    return out


def _out_folder(out: Path, flag: str = "--out", what: str = "the model file") -> None:
    """Create --out's folder and make sure it takes files, before training."""
    check_file_target(out, flag, what)


def _check_batch_fits(src, data, size, train) -> None:
    """A batch of a folder's images at --size (float32, ``train``'s batch size) must fit in
    this machine's memory: --size 100000 ran about two minutes and was killed by the kernel
    (22 GB resident), naming nothing.  A lower bound (the activations come on top): what
    fails it cannot run here."""
    import inspect

    if not Path(data).is_dir():   # an .npz's images have their own size
        return
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not POSIX: no figure to compare with
        return
    batch = inspect.signature(train).parameters["batch_size"].default
    need = batch * 4 * int(np.prod(src.image_shape))
    if need > memory:
        c, h, w = src.image_shape
        raise ValueError(f"--size {size}: a training batch of {batch} images of {c}x{h}x{w} from {data} takes "
                         f"{need / 2 ** 30:,.1f} GiB as float32, more than this machine's {memory / 2 ** 30:,.1f} "
                         f"GiB of memory; choose a smaller --size")


FOLDER_SIZE, FOLDER_CHANNELS = 64, 3   # --size/--channels when not given
FOLDER_SHAPE_HELP = (f"image size for folders; an .npz keeps its own (default: {FOLDER_SIZE})",
                     f"channels for folders; an .npz keeps its own (default: {FOLDER_CHANNELS})")


def _folder_shape(args, *paths) -> None:
    """--size/--channels read folders only: given where every input is an .npz they went
    unused without a word (an .npz keeps the shape it was written at).  Fills the defaults."""
    given = [f"--{name} {v}" for name, v in (("size", args.size), ("channels", args.channels)) if v is not None]
    named = [p for p in paths if p]
    # files only: a mistyped folder is no archive (its own error follows)
    if given and named and all(Path(p).is_file() for p in named):
        logging.getLogger("spurfast.cli").warning(
            "%s %s no effect: %s %s arrays, read at the shape they were written at; these options size "
            "the images of a folder", " and ".join(given), "have" if len(given) > 1 else "has",
            " and ".join(map(str, named)), "hold" if len(named) > 1 else "holds")
    args.size = FOLDER_SIZE if args.size is None else args.size
    args.channels = FOLDER_CHANNELS if args.channels is None else args.channels


def cmd_train_classifier(args):
    from .models.files import save_classifier
    from .models.train import train_classifier
    check_device(args.device)
    _folder_shape(args, args.data)
    out = _model_out(args.out, data=args.data, class_names=args.class_names)
    src, _ = load_pool(args.data, args.size, args.channels, args.class_names)
    _check_batch_fits(src, args.data, args.size, train_classifier)
    # an .npz's own names, which it keeps, skipped the class-count check: a model of another
    # width trained, and discover refused it on that data
    class_names = _class_names_used(args.class_names, "data", args.data, src)
    if class_names and args.num_classes:   # discover refuses the pair: the model would be of no use with it
        check_class_count(class_names, args.num_classes)
    else:
        check_npz_class_count(src, args.num_classes, "data", args.data)
    # an .npz's own class names count too: a class without training images still gets an output
    n_classes = args.num_classes or (len(src.class_names) if src.class_names else
                                     int(src.labels().max(initial=-1)) + 1)   # empty: training names it
    if not class_names:   # as discover refuses it: the model trained, and no run could use its folder
        check_labelled_folder(src, n_classes, "data", args.data)
    with _model_folder(out):
        model = train_classifier(src, n_classes, arch=args.arch, epochs=args.epochs, seed=args.seed,
                                 device=args.device, checkpoint=str(args.out) + ".ckpt", progress=not args.quiet)
        save_classifier(model, args.out)
    print(f"wrote {args.out}")


def cmd_train_vae(args):
    from .models.files import save_vae
    from .models.train import train_vae
    from .models.vae import VAEConfig
    check_device(args.device)
    _folder_shape(args, args.data)
    out = _model_out(args.out, data=args.data)
    src, _ = load_pool(args.data, args.size, args.channels)
    _check_batch_fits(src, args.data, args.size, train_vae)
    c, h, _ = src.image_shape
    with _model_folder(out):
        vae = train_vae(src, VAEConfig.for_images(c, h, args.latent_dim), epochs=args.epochs, seed=args.seed,
                        device=args.device, checkpoint=str(args.out) + ".ckpt", progress=not args.quiet)
        save_vae(vae, args.out)
    print(f"wrote {args.out}")


def _loader_has_no_effect(args):
    logging.getLogger("spurfast.cli").warning(
        "--loader-backend %s has no effect: pool %s holds arrays, which no loader decodes",
        args.loader_backend, args.pool)


def cmd_discover(args):
    from .models.files import load_classifier, load_vae
    from .models.outputs import check_width, output_width, shape_text
    from .pipeline import run_discovery
    check_device(args.device)
    check_backends(args.device, kmeans_backend=(args.kmeans_backend, KMEANS_OPS),
                   encoder_backend=(args.encoder_backend, ("encoder",)), **ENV_ONLY,
                   # only folder pools go through a loader backend (and an unlabelled --clean folder: below)
                   **({"loader_backend": (args.loader_backend, ("loader",))} if Path(args.pool).is_dir() else {}))
    _folder_shape(args, args.pool, None if args.no_confirm else args.clean)
    pool, extra = load_pool(args.pool, args.size, args.channels, args.class_names)
    # an .npz that names its own classes keeps them: --class-names then names nothing of this
    # run (yet the width check blamed it, and a nameless --clean .npz took its names and was
    # refused as another set's classes)
    class_names = _class_names_used(args.class_names, "pool", args.pool, pool)
    # after the pool is read: a missing or damaged one was first said to hold arrays; a --clean
    # folder may go through the loader (below, once it is read)
    clean_folder = bool(args.clean) and not args.no_confirm and Path(args.clean).is_dir()
    loader_unused = args.loader_backend not in (None, "auto") and not Path(args.pool).is_dir()
    if loader_unused and not clean_folder:
        _loader_has_no_effect(args)
    if args.class_names and args.num_classes:
        # without --num-classes the classifier's output width is checked against the file; with it,
        # a shorter file labelled folders by a partial list and left later classes' findings unnamed
        check_class_count(args.class_names, args.num_classes)
    else:
        check_npz_class_count(pool, args.num_classes, "pool", args.pool)
    n_classes = args.num_classes or (len(pool.class_names) if pool.class_names else None)
    clf = load_classifier(args.classifier, arch=args.arch, in_channels=pool.image_shape[0],
                          num_classes=n_classes, image_size=pool.image_shape[1],   # a state_dict needs them
                          weights_only=not args.unsafe_load)
    if n_classes is None:
        # labels alone do not say how many classes the classifier has (the top ones may be absent)
        labelled = int(pool.labels().max(initial=-1)) >= 0
        raise ValueError(f"pool {args.pool} " + ("has labels but no class names" if labelled else "is unlabelled")
                         + ": pass --num-classes (the classifier's number of classes)"
                         + (" or --class-names FILE" if labelled else ""))
    named = dict(name=f"classifier {args.classifier}", pool=f"pool {args.pool}")
    # a short class_names list of the pool's read as the classifier's fault
    origin = ("--num-classes" if args.num_classes else f"the names in --class-names {class_names}"
              if class_names else f"the class folders of {args.pool}" if _labelled_folder(pool)
              else f"the class_names of {args.pool}")
    width = output_width(clf, pool.image_shape, **named)   # one trial forward for the checks below
    # with --num-classes, first: one the classifier does not have was blamed on the classifier
    # by the folder check
    if args.num_classes:
        check_width(width, n_classes, name=named["name"], classes_from=origin)
    if not args.class_names and _labelled_folder(pool):
        check_labelled_folder(pool, width, "pool", args.pool)   # = --num-classes where given (checked above)
    if not args.num_classes:
        check_width(width, n_classes, name=named["name"], classes_from=origin)
    vae = load_vae(args.vae, weights_only=not args.unsafe_load)
    vae_shape = (vae.config.in_channels, vae.config.image_size, vae.config.image_size)
    if vae_shape != tuple(pool.image_shape):
        raise ValueError(f"VAE {args.vae} expects images of shape {shape_text(vae_shape)} (CxHxW), "
                         f"pool {args.pool} has {shape_text(pool.image_shape)}; train the VAE on this pool "
                         f"(`spurfast train-vae`; for folders: the same --size/--channels)")
    suspect = extra.get("suspect")
    if args.suspect:
        suspect = load_suspect(args.suspect, len(pool), args.pool)
    elif suspect is not None and suspect.shape != (len(pool),):
        raise ValueError(f"pool {args.pool}: its 'suspect' array has shape {suspect.shape}, expected ({len(pool)},) "
                         f"(one entry per image)")
    clean = None
    if args.clean and args.no_confirm:   # it went without a word, even a path to nothing
        logging.getLogger("spurfast.cli").warning("--clean %s has no effect: --no-confirm leaves confirmation out, "
                                                  "the only step that reads it", args.clean)
    if args.clean and not args.no_confirm:
        clean, _ = load_pool(args.clean, args.size, args.channels, class_names)
        clean = same_classes(clean, pool, args.clean, args.pool)   # --class-names leaves an .npz's own names
        if not class_names:
            check_labelled_folder(clean, n_classes, "clean set", args.clean)
        if tuple(clean.image_shape) != tuple(pool.image_shape):
            # a folder takes the shape it is read at: with an .npz pool, --size/--channels' defaults
            hint = (f"; a folder is read at --size {args.size} --channels {args.channels}: give the pool's"
                    if Path(args.clean).is_dir() else "")
            raise ValueError(f"clean set {args.clean} has images of shape {shape_text(clean.image_shape)} (CxHxW), "
                             f"pool {args.pool} has {shape_text(pool.image_shape)}{hint}")
    # confirmation predicts an unlabelled --clean folder through the loader (a labelled one is not)
    clean_loaded = clean is not None and getattr(clean, "paths", None) is not None and (clean.labels() < 0).any()
    if not Path(args.pool).is_dir() and clean_loaded:
        # with an .npz pool that backend went unchecked, and a bad one failed at confirmation,
        # after the embedding pass and discovery
        check_backends(args.device, loader_backend=(args.loader_backend, ("loader",)))
    if loader_unused and clean_folder and not clean_loaded:   # a labelled one went without the warning
        _loader_has_no_effect(args)
    from . import distributed as dist
    dist.init(args.device)  # under torchrun: join the group (gloo on CPUs, NCCL on GPUs); else a no-op
    try:
        doc, _, _ = run_discovery(pool, clf, vae, args.out, num_classes=n_classes, suspect=suspect,
                                  config=_discover_config(args), overwrite=args.overwrite,
                                  batch_size=args.batch_size, encoder_backend=args.encoder_backend,
                                  loader_backend=args.loader_backend, progress=not args.quiet, clean=clean,
                                  confirm=not args.no_confirm, residual=_residual_config(args),
                                  feature_view=args.feature_view,
                                  protect=[args.pool, args.classifier, args.vae, args.suspect, args.clean,
                                           args.class_names])
    finally:
        dist.shutdown()
    if doc is not None:  # rank 0 (or the only process) wrote the report
        print(f"{len(doc['findings'])} findings{_verdict_counts(doc['findings'])}; "
              f"report: {Path(args.out) / 'report.html'}")


def _verdict_counts(findings: list[dict]) -> str:
    """' (2 confirmed, 1 weak, 5 class_content)': the confirmation verdicts, most useful
    first; empty when confirmation did not run."""
    from collections import Counter

    from .confirm import VERDICTS
    n = Counter((f.get("confirm") or {}).get("verdict") for f in findings)
    parts = [f"{n[v]} {v}" for v in VERDICTS if n[v]]
    return f" ({', '.join(parts)})" if parts else ""


def cmd_make_pool(args):
    from .make_pool import PoolSpec, make_pool, parse_size
    lo, hi = parse_size(args.size)
    spec = PoolSpec(n=args.n, classes=args.classes, min_size=lo, max_size=hi, flat=args.flat, plant=args.plant,
                    fraction=args.fraction, plant_class=args.plant_class, strength=args.strength,
                    target_size=args.target_size, quality=args.quality, seed=args.seed,
                    pattern_seed=args.pattern_seed)
    info = make_pool(args.out, spec, workers=args.workers, progress=not args.quiet, overwrite=args.overwrite)
    planted = f"{info['n_carrying']} carry {args.plant}" if args.plant else "no pattern planted"
    if info.get("already_complete"):
        print(f"{args.out} already holds this pool ({info['n']} images, {planted}): nothing written; ground truth: "
              f"{Path(args.out) / 'ground_truth.csv'}")
        return
    kept = f"; {info['resumed_with']} kept from the interrupted run" if info.get("resumed_with") else ""
    print(f"wrote {info['n']} images ({planted}) to {args.out} "
          f"in {info['seconds']:.1f} s ({info['images_per_s']:.0f} img/s{kept}); ground truth: "
          f"{Path(args.out) / 'ground_truth.csv'}")


EVALUATE_RUN_ONLY = ("preset", "only", "seeds", "cache", "statistic", "null", "residual_scan", "feature_view")


def cmd_evaluate(args):
    import re

    from .evaluate import check_result_slots, run_evaluation
    from .results_doc import check_ours, check_results_md, read_csv, read_results, write_results, write_with_notes
    out = Path(args.out)
    # a file (or a link to nothing) in its place failed as "[Errno 17] File exists: 'x'", which says neither
    blocker = folder_blocker(out)
    if blocker is not None:
        raise NotADirectoryError(f"{not_a_folder('--out', out, blocker)}; expected the folder for "
                                 f"results.csv, confirm.csv, plots/ and RESULTS.md")
    check_result_slots(out, "--out")
    if args.cache is not None:   # "[Errno 20] Not a directory: 'x/runs'" after --out was made, and left empty
        blocker = folder_blocker(Path(args.cache))
        if blocker is not None:
            raise NotADirectoryError(f"{not_a_folder('--cache', Path(args.cache), blocker)}; expected the folder "
                                     f"for the cached models and runs")
    if args.results_md:   # --from-csv too, which runs no sweep (each failed at the end)
        check_results_md(args.results_md, "--results-md")
    # "docs/new/" (no such folder yet): Path drops the "/", and the tables went to a file "docs/new"
    if args.results_md and os.path.basename(args.results_md) in ("", ".", ".."):
        raise IsADirectoryError(f"--results-md {args.results_md} names a folder; expected the file to write, e.g. "
                                f"{Path(args.results_md) / 'RESULTS.md'}")
    if args.results_md and os.path.exists(args.results_md) and not os.access(args.results_md, os.W_OK):
        # a read-only file is rewritten in place, in a folder that may well take files: it failed at the end
        raise PermissionError(f"--results-md {args.results_md}: the file is not writable; make it writable or "
                              f"choose another place for RESULTS.md")
    if args.results_md and not os.access(args.results_md, os.W_OK):   # and in a folder that takes no files
        _out_folder(Path(args.results_md), "--results-md", "RESULTS.md")   # (a writable file is rewritten in place)
    if args.results_md:   # a slip (--results-md out/results.csv) wrote the tables over the results they came from
        data = [Path(args.out) / n for n in ("results.csv", "confirm.csv", "timing.json")]
        if args.from_csv:
            data += [Path(args.from_csv), *(Path(args.from_csv).with_name(n) for n in ("confirm.csv", "timing.json"))]
        clash = next((f for f in data if f.resolve() == Path(args.results_md).resolve()), None)
        if clash is not None:
            raise FileExistsError(f"--results-md {args.results_md} is the evaluation's {clash.name} ({clash}): "
                                  f"RESULTS.md would be written over it; choose another file, e.g. docs/RESULTS.md")
        check_ours(Path(args.results_md), "--results-md")
    if args.from_csv:
        given = [f"--{k.replace('_', '-')}" for k in EVALUATE_RUN_ONLY if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to a run, but --from-csv {args.from_csv} regenerates "
                             f"RESULTS.md and plots from that CSV as it is; drop {' and '.join(given)}")
        csv_path = Path(args.from_csv)
        need_file(csv_path, "results CSV")
        out = Path(args.out)
        # read_notes (in check_ours): a RESULTS.md that is not UTF-8 failed with the codec's message, naming no file
        previous = check_ours(out / "RESULTS.md", "--out's")
        tj = csv_path.with_name("timing.json")
        try:
            timing = json.loads(tj.read_text()) if tj.is_file() else None
        except ValueError as exc:   # json's message named no file
            raise ValueError(f"{tj} (the run's timing, beside {csv_path}) is not readable JSON ({exc}); "
                             f"rerun the evaluation, or remove it") from None
        if timing is not None and not isinstance(timing, dict):   # a list: an AttributeError traceback
            raise ValueError(f"{tj} (the run's timing, beside {csv_path}) holds a {type(timing).__name__}, not the "
                             f"object `spurfast evaluate` writes; rerun the evaluation, or remove it")
        # all inputs are read before --out is made: a CSV that is not a results CSV (or a bad confirm.csv
        # beside it) failed in write_results after --out had been created, and left that folder behind
        if not read_results(csv_path, csv_path.with_name("confirm.csv"))[0]:
            # a header alone was written up as a document of empty tables; no evaluation writes one
            raise ValueError(f"{csv_path} holds a header and no rows: no results to write up (rerun the "
                             f"evaluation)")
        # quoted for a shell, as the run's own "Command:" line is: a path with a space split in two
        regenerated_by = shlex.join(["spurfast", "evaluate", "--from-csv", str(csv_path), "--out", str(out)]
                                    + (["--results-md", str(args.results_md)] if args.results_md else []))
        made = _first_missing(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            md = write_results(csv_path, csv_path.with_name("confirm.csv"), out / "RESULTS.md",
                               plots_dir=out / "plots", command=(timing or {}).get("command", ""), timing=timing,
                               regenerated_by=regenerated_by,
                               wall_s=(timing or {}).get("wall_s"))   # none in a hand-edited one: no wall-time line
            write_with_notes(md, previous, out, args.results_md)   # as a run does
        except BaseException:   # a failed write (or Ctrl-C) leaves no half-written folder of its own making
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise
        also = args.results_md and Path(args.results_md).resolve() != Path(md).resolve()   # not the same file twice
        print(f"wrote {md}" + (f" and {args.results_md}" if also else "") + f" from {len(read_csv(csv_path))} rows")
        return
    # the run's ops, as discover and demo check them: an unavailable SPURFAST_BACKEND_<OP> failed
    # only at the first discovery, after training (a misspelt op was never refused)
    # the sweep embeds on the CPU and names the eager encoder only where CUDA is not available:
    # with a GPU it leaves the encoder to SPURFAST_BACKEND(_ENCODER), which failed after training
    import torch
    encoder = {"encoder": (None, ("encoder",))} if torch.cuda.is_available() else {}
    check_backends("cpu", kmeans_backend=(None, KMEANS_OPS), **ENV_ONLY, **encoder)
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as exc:
            raise ValueError(f"--only {args.only!r} is not a valid regular expression: {exc}") from None
    run_evaluation(args.preset or "quick", args.out, cache=args.cache, only=args.only, seeds=args.seeds,
                   progress=not args.quiet, results_md=args.results_md, statistic=args.statistic or DEFAULT_STATISTIC,
                   null=args.null or DEFAULT_NULL, residual=bool(args.residual_scan),
                   feature_view=bool(args.feature_view))


def cmd_report(args):
    from .run_folder import hold_output, holds_output, release_output
    run = Path(args.run)
    if not (run / "findings.json").is_file():
        raise FileNotFoundError(f"{run} holds no findings.json (run `spurfast discover` first)")
    # a discover run still writing here renames and deletes the pictures the report inlines,
    # and writes its own report.html over this one (or this one over its); a hold this thread
    # had already (main() called in-process by a caller holding the folder) stays its caller's
    held = holds_output(run)
    hold_output(run)
    try:
        _rewrite_report(run)
    finally:
        if not held:
            release_output(run)


def _rewrite_report(run: Path) -> None:
    from .run_folder import BAD_FILES, read_bad_files
    from .report import write_report
    f = run / "findings.json"
    # the run writes its files whole, but one an interrupted older run cut short, or a hand
    # edit, made json's message, which names no file
    def cut_short(name, exc):
        return ValueError(f"{run / name} is not readable JSON ({exc}); rerun `spurfast discover` (or `spurfast "
                          f"demo`) on this run")
    try:
        doc = json_document(f.read_text())
    except ValueError as exc:
        raise cut_short("findings.json", exc) from None
    clusters = []
    if (run / "clusters.csv").is_file():
        import csv
        try:
            with open(run / "clusters.csv") as fh:
                clusters = [{"score": float(r["score"]), "q_value": float(r["q_value"])} for r in csv.DictReader(fh)]
        except (KeyError, TypeError, ValueError) as exc:   # a cut-short last row reads as None
            raise ValueError(f"{run / 'clusters.csv'} is not a clusters table spurfast wrote "
                             f"({exc.__class__.__name__}: {exc}); rerun `spurfast discover` on this run") from None
    try:
        summary = json_document((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    except ValueError as exc:
        raise cut_short("summary.json", exc) from None
    source = BAD_FILES if (run / BAD_FILES).is_file() else "store/manifest.json"
    try:
        bad_files = read_bad_files(run)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise cut_short(source, exc) from None
    except (KeyError, TypeError, ValueError) as exc:   # readable JSON with a bad value (or a key gone: a
        if str(run / source) in str(exc):                # traceback): "not readable JSON" was false
            raise   # the store's own message names the file already
        raise ValueError(f"{run / source} is not as spurfast wrote it ({exc.__class__.__name__}: {exc}); rerun "
                         f"`spurfast discover` (or `spurfast demo`) on this run") from None
    # both are written as objects: a hand-edited list or string ended in an AttributeError traceback
    for name, value in (("summary.json", summary), (BAD_FILES, bad_files)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{run / name} holds a JSON {type(value).__name__}, expected an object (name: value, "
                             f"as `spurfast discover` writes it); rerun `spurfast discover` on this run, or remove it")
    print(f"wrote {write_report(doc, run, clusters=clusters, bad_files=bad_files, summary=summary)}")


def cmd_env(args):
    import platform

    import torch

    from . import __version__, backends
    # as every run does: a SPURFAST_BACKEND* variable that discover refuses is refused here too
    # (env listed every backend "available" under SPURFAST_BACKEND=Torch)
    backends.check_op_variables()
    info = {"spurfast": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    for mod in ("triton", "cupy", "nvidia.dali", "torchvision", "numpy", "sklearn"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "?")
        except Exception as exc:
            info[mod] = f"not importable ({exc.__class__.__name__})"
    info["backends"] = backends.report()
    print(json.dumps(info, indent=1))


CLASS_NAMES_HELP = ("text file of the classifier's class names, one a line, in label order: class folders are "
                    "labelled by their name's place in it (default: sorted folder order, wrong when the folders "
                    "are not exactly the classifier's classes); an .npz takes the names only if it has none")


class _DefaultsShown(argparse.HelpFormatter):
    """Each option's help ends with its default where it has one worth saying (not None,
    False or empty) and the help does not say it already: --size, --k, --fdr ... showed none."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        # "is": 0 == False, and --seed's 0 went unsaid
        if (action.option_strings and "default" not in text and d is not None and d is not argparse.SUPPRESS
                and not isinstance(d, bool) and d != ""):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """The parser of spurfast and, as its type, of every subcommand: defaults shown."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsShown)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="spurfast", description="Find the spurious features an image classifier learned.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="plant a shortcut in Fashion-MNIST (or digits), train, discover, report")
    p.add_argument("--out", default="out/demo", help="run directory: models, store, findings, report.html")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "digits"], help=DATASET_HELP)
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--classifier-epochs", type=_int_at_least(1), default=3, help="classifier training epochs")
    p.add_argument("--vae-epochs", type=_int_at_least(1), default=8, help="VAE training epochs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different spurfast run in --out, deleting everything in it (never a folder "
                        "spurfast did not write), but keeping its trained models and embedding store when it "
                        "differs only in its discovery settings (--fdr, --k, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_pattern_args(p)
    _add_discover_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plant", help="write planted train/pool/clean .npz files and plant.json")
    p.add_argument("--out", required=True, help="directory for train.npz, pool.npz, clean.npz and plant.json")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "digits"], help=DATASET_HELP)
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace train.npz, pool.npz, clean.npz and plant.json in --out even if `spurfast plant` "
                        "did not write them (an earlier plant output is replaced without it)")
    _add_pattern_args(p)
    p.set_defaults(func=cmd_plant)

    for name, func, help_ in (("train-classifier", cmd_train_classifier, "train a classifier on a labelled .npz or folder"),
                              ("train-vae", cmd_train_vae, "train the VAE on a pool (.npz or folder)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--data", required=True, help=".npz from `spurfast plant`, or an image folder")
        p.add_argument("--out", required=True, help="model file to write")
        p.add_argument("--epochs", type=_int_at_least(1), default=3 if name == "train-classifier" else 8,
                       help="training epochs")
        p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
        p.add_argument("--device", default="cpu",
                       help="torch device: cpu (the default, also on a GPU machine), cuda, cuda:1, ...")
        p.add_argument("--size", type=int, default=None, help=FOLDER_SHAPE_HELP[0])
        p.add_argument("--channels", type=int, default=None, help=FOLDER_SHAPE_HELP[1])
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "train-classifier":
            p.add_argument("--arch", default="small_cnn", choices=["small_cnn", "resnet18"],
                           help="classifier architecture")
            p.add_argument("--num-classes", type=_int_at_least(1), default=None,
                           help="outputs of the classifier (default: the data's class names, else its largest "
                                "label + 1)")
            p.add_argument("--class-names", default=None, metavar="FILE", help=CLASS_NAMES_HELP)
        else:
            p.add_argument("--latent-dim", type=int, default=16, help="dimensions of the VAE latent")
        p.set_defaults(func=func)

    p = sub.add_parser("discover", help="embed a pool, cluster per class, score, test and report")
    p.add_argument("--pool", required=True, help=".npz from `spurfast plant`, or an image folder")
    p.add_argument("--classifier", required=True, help="TorchScript file, spurfast checkpoint, or state_dict (+ --arch)")
    p.add_argument("--vae", required=True, help="VAE checkpoint from `spurfast train-vae`")
    p.add_argument("--out", required=True, help="run directory: store, findings.json/.csv, report.html")
    p.add_argument("--arch", default=None, choices=["small_cnn", "resnet18"], help="architecture of a bare state_dict")
    p.add_argument("--num-classes", type=_int_at_least(1), default=None,
                   help="the classifier's number of classes (default: the pool's class names; needed for an "
                        "unlabelled pool)")
    p.add_argument("--class-names", default=None, metavar="FILE", help=CLASS_NAMES_HELP + " (also for --clean)")
    p.add_argument("--suspect", default=None, help="text file of pool indices that are suspect samples")
    p.add_argument("--clean", default=None, help="held-out clean images (.npz or folder) for confirmation; default: "
                   "pool images predicted as other classes outside every finding, suspect samples left out")
    p.add_argument("--no-confirm", action="store_true", help="skip confirmation (findings' confirm stays null)")
    p.add_argument("--residual-scan", action="store_true",
                   help="also test per class for a localised pattern the VAE latent does not hold (one pixel), "
                        "in the reconstruction residuals: one more pass over the pool, every residual in memory "
                        "(spurfast.residual)")
    p.add_argument("--feature-view", action="store_true",
                   help="also cluster, score and test the classifier's penultimate features within each predicted "
                        "class, as the VAE latents are; those of its findings that confirmation confirms join the "
                        "latent ones by q-value. Finds what the latent does not hold (one pixel); not with "
                        "--no-confirm (spurfast.feature_view)")
    p.add_argument("--residual-max-values", type=_int_at_least(1), default=None, metavar="N",
                   help="the residual scan refuses pools of more than N residual values (images x C x H x W), "
                        "about 20 bytes of memory each (default: 2**26, about 1.3 GB)")
    p.add_argument("--residual-null", type=_int_at_least(1, RESIDUAL_MAX_NULL), default=None, metavar="N",
                   help="the residual scan's null resamplings (default 400): its p-values go down to 1/(N + 1), "
                        "and Benjamini-Hochberg over m classes needs about m/FDR for a lone finding")
    p.add_argument("--residual-fdr", type=_open_unit, default=None, metavar="Q",
                   help="the residual scan's own Benjamini-Hochberg level over classes (default: --fdr): its "
                        "test is a separate one, over classes rather than clusters")
    p.add_argument("--size", type=int, default=None, help=FOLDER_SHAPE_HELP[0])
    p.add_argument("--channels", type=int, default=None, help=FOLDER_SHAPE_HELP[1])
    p.add_argument("--batch-size", type=_int_at_least(1), default=256,
                   help="images per batch of the embedding pass (the loader's batch; on a CPU the models take them "
                        "64 at a time, which keeps a layer's output in cache)")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--encoder-backend", default=None, choices=["auto", "torch", "triton"],
                   help=backend_help("VAE encoder", "ENCODER"))
    p.add_argument("--loader-backend", default=None, choices=["auto", "torch", "dali"],
                   help=backend_help("image folder decoding", "LOADER"))
    p.add_argument("--unsafe-load", action="store_true", help="torch.load with weights_only=False (trusted files only)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different spurfast run in --out, deleting everything in it (never a folder "
                        "spurfast did not write, nor one holding the inputs), but keeping its embedding store "
                        "when that was made from the same pool and models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_discover_args(p)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("make-pool", help="write a procedural ImageNet-like JPEG folder pool (optionally planted)")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", default="64:160", help="image side length N or range MIN:MAX (varied sizes)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (each has its own look)")
    p.add_argument("--flat", action="store_true", help="one unlabelled folder instead of one folder per class")
    p.add_argument("--plant", default=None, help="pattern family to plant: pixel, patch3, patch5, noise, bar")
    p.add_argument("--fraction", type=float, default=0.0, help="fraction of images (of --plant-class) that carry it")
    p.add_argument("--plant-class", type=int, default=None, help="plant only into this class (default: any)")
    p.add_argument("--strength", type=float, default=1.0, help="noise amplitude (0, 1]; the painted patterns (pixel, patch3, patch5, bar) are white: 1 only")
    p.add_argument("--target-size", type=int, default=64, help="loader image size the pattern is defined at (<= the smallest --size)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--workers", type=_int_at_least(1), default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=_seed, default=0, help=SEED_HELP)
    p.add_argument("--pattern-seed", type=_seed, default=0,
                   help="seed of the noise pattern alone (default 0): pools of other --seed share it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a pool make-pool wrote in --out (never a folder it did not write)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_make_pool)

    p = sub.add_parser("evaluate", help="planted-shortcut evaluation: spurfast vs baselines -> CSV, plots, RESULTS.md")
    # run-only options default to None so that --from-csv can refuse them
    p.add_argument("--preset", default=None, choices=["quick", "full", "tiny"],
                   help="settings and seeds to sweep (default: quick)")
    p.add_argument("--out", required=True, help="directory for results.csv, confirm.csv, plots/, RESULTS.md")
    p.add_argument("--cache", default=None, help="model/store cache (default: OUT/cache); reruns reuse it")
    p.add_argument("--only", default=None, help="regular expression: run only the matching settings")
    p.add_argument("--seeds", default=None, type=_seed_list, help="comma-separated seeds (default: the preset's)")
    p.add_argument("--results-md", default=None,
                   help="also write RESULTS.md here (e.g. docs/RESULTS.md), keeping that file's notes (the "
                        "text below its '<!-- notes: ... -->' line, which ends every RESULTS.md written)")
    p.add_argument("--from-csv", default=None, help="only regenerate RESULTS.md and plots from this results.csv "
                   "(with --out and --results-md; the run options do not apply)")
    p.add_argument("--statistic", default=None, choices=STATISTICS,
                   help=f"discovery's agreement statistic (see discover --statistic; default: {DEFAULT_STATISTIC})")
    p.add_argument("--null", default=None, choices=NULLS, help=f"discovery's null (see discover --null; default: "
                   f"{DEFAULT_NULL})")
    p.add_argument("--residual-scan", action="store_true", default=None,
                   help="also evaluate spurfast+residual: spurfast's findings and the residual scan's "
                        "(spurfast.residual: patterns the VAE latent does not hold, e.g. one pixel)")
    p.add_argument("--feature-view", action="store_true", default=None,
                   help="also evaluate the feature view (spurfast.feature_view): alone (features) and joined to "
                        "spurfast's findings (spurfast+features, +confirm, spurfast+confirmed-features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="rewrite report.html of a run from its findings.json")
    p.add_argument("--run", required=True, help="output directory of a discover/demo run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("env", help="versions and which backends are usable here")
    p.set_defaults(func=cmd_env)
    return ap


class _ClosedTolerant:
    """A standard stream that drops what it is given once its reader has gone (a pipe closed by
    `| head -1`, or a stream closed with `2>&-`): a progress bar or a result line then stopped a
    run halfway (BrokenPipeError, or tqdm's AttributeError on a None stderr) with no message.
    The work goes on; its files say what it did."""

    def __init__(self, stream):
        self._stream, self._gone = stream, stream is None

    def _drop(self):
        self._gone = True
        try:   # the interpreter's own flush at exit would raise again: point the descriptor at nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass

    def write(self, text):
        if not self._gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):   # ValueError: a closed file
                self._drop()
        return len(text)

    def flush(self):
        if not self._gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._drop()

    def isatty(self):
        return not self._gone and self._stream.isatty()

    def __getattr__(self, name):
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def main(argv=None) -> int:
    saved = sys.stdout, sys.stderr   # given back: main() is called in-process too (tests, notebooks)
    sys.stdout, sys.stderr = (s if isinstance(s, _ClosedTolerant) else _ClosedTolerant(s) for s in saved)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = saved


def _main(argv) -> int:
    from .backends import BackendUnavailable  # light: imports neither torch nor a kernel
    # a path that is not UTF-8 (read with surrogate escapes) in a result line ("wrote ...") raised
    # under a strict stdout (a UTF-8 locale): exit 2 and "'utf-8' codec can't encode", after the work
    # was written.  stderr always escapes such characters; stdout now does as well
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:   # the parser imports torch (seconds under load): a Ctrl-C there printed torch's import traceback
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted before the command started: nothing was done", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # an empty path is the current folder to pathlib: --out "" (an unset shell variable) planted
    # into it, and --pool "" read it as a folder pool
    empty = sorted(f"--{k.replace('_', '-')}" for k, v in vars(args).items() if isinstance(v, str) and v == "")
    if empty:
        print(f"error: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty; expected a value (a path, for "
              f"a file or folder)", file=sys.stderr)
        return 2
    _note_an_unused_gpu(args, sys.argv[1:] if argv is None else argv)
    world = os.environ.get("WORLD_SIZE", "1").strip()
    if args.command not in ("discover", "env") and world.isdigit() and int(world) > 1:
        # each rank ran the whole command: two make-pools wrote one folder at once, each calling
        # the other's images leftovers of an interrupted run
        print(f"error: only `spurfast discover` runs across ranks (WORLD_SIZE={world}); run `spurfast "
              f"{args.command}` as one process, without torchrun", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (OSError, ValueError, BackendUnavailable) as exc:
        # OSError: not found, exists, permissions, and a read-only or full file system (EROFS,
        # ENOSPC, EDQUOT), which gave a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # a traceback did not say that the finished work is kept
        if args.command == "make-pool":
            # with --overwrite, "the same command" deleted the images written and drew them all again
            again = ("the same command without --overwrite resumes it" if args.overwrite else
                     "the same command resumes it")
            print(f"interrupted: pool {args.out} is incomplete; {again} (the images written are kept), "
                  f"--overwrite writes it anew", file=sys.stderr)
            return 130
        if args.command == "plant":   # nothing of it is resumed: a rerun writes every file anew
            print(f"interrupted: rerun the same command to plant into {args.out} (its files are written whole, then "
                  f"renamed into place, plant.json last; a plant.json that says \"incomplete\" marks renames cut "
                  f"short, any other is the earlier plant's, whole)", file=sys.stderr)
            return 130
        if args.command == "evaluate":   # its discovery keeps no work: a run cut short starts over
            print("interrupted: finished work is kept (trained models and training checkpoints, embedding stores, "
                  "finished runs); the same `spurfast evaluate` command resumes", file=sys.stderr)
            return 130
        # the rest said what discover keeps: "the embedding store, discovery's neighbours and null"
        # for a report, which keeps and resumes none of it
        if args.command in ("train-classifier", "train-vae"):
            print(f"interrupted: the epochs finished are kept in {args.out}.ckpt; the same `spurfast {args.command}` "
                  f"command resumes from it", file=sys.stderr)
        elif args.command == "report":
            print(f"interrupted: {args.run}/report.html is written whole, so it is the earlier page or the new one; "
                  f"run the same command again", file=sys.stderr)
        elif args.command == "env":
            print("interrupted: env changes nothing; run it again", file=sys.stderr)
        else:
            # discover trains nothing: "training checkpoints" named work it never had
            trained = "training checkpoints, " if args.command == "demo" else ""
            print(f"interrupted: finished work is kept ({trained}the embedding store, discovery's "
                  f"neighbours and null); the same `spurfast {args.command}` command resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
