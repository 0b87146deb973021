from .vae import VAE, VAEConfig  # noqa: F401
from .classifier import SmallCNN, build_classifier  # noqa: F401
from .files import load_classifier  # noqa: F401
from .outputs import classifier_outputs  # noqa: F401

__all__ = ["VAE", "VAEConfig", "SmallCNN", "build_classifier", "load_classifier", "classifier_outputs"]
