"""spurfast: find the spurious features ("shortcuts") an image classifier has learned.

Importing spurfast imports torch and numpy only: no triton, cupy or DALI, and no CUDA
initialisation.  The public API mirrors the CLI (`spurfast --help`); its names load their
module on first use (``spurfast.run_discovery`` imports the pipeline then, not at import):

    from spurfast import ArraySource, DiscoverConfig, load_classifier, load_vae, run_discovery
    doc, result, store = run_discovery(pool, load_classifier("clf.pt"), load_vae("vae.pt"), "out/run",
                                       num_classes=10, suspect=suspect_mask, config=DiscoverConfig(seed=0))
"""
__version__ = "0.1.0"

# name -> module (relative to spurfast).  Step functions whose name is a module's
# (spurfast.discover.discover, spurfast.discover.characterise beside the module
# spurfast.characterise) stay in their module: the top-level name would be the function or
# the module depending on which was imported first.
_API = {
    # data
    "ImageSource": "data.sources", "ArraySource": "data.sources", "SubsetSource": "data.sources",
    "ConcatSource": "data.sources", "ImageFolderSource": "data.folder",
    # models
    "build_classifier": "models.classifier", "load_classifier": "models.files",
    "save_classifier": "models.files", "train_classifier": "models.train", "train_vae": "models.train",
    "load_vae": "models.files", "save_vae": "models.files",
    # the pipeline and its steps
    "run_discovery": "pipeline", "embed_pool": "embed", "EmbeddingStore": "store",
    "DiscoverConfig": "discover", "DiscoveryResult": "discover", "write_outputs": "discover",
    "batched_kmeans": "cluster", "pattern_rankings": "pattern_rank",
    "ConfirmConfig": "confirm", "confirm_findings": "confirm", "rank_confirmed_first": "pipeline",
    "training_support": "support",
    "write_report": "report",
    # planting, demo, evaluation
    "PatternSpec": "plant", "apply_pattern": "plant", "run_demo": "demo", "run_evaluation": "evaluate",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'spurfast' has no attribute {name!r}")
    from importlib import import_module
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value   # once: later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
