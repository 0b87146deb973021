from .vae import VAE, VAEConfig  # noqa: F401
from .classifier import SmallCNN, build_classifier, load_classifier, classifier_outputs  # noqa: F401
