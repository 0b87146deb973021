"""Image sources (one small interface) and the loaders that stream them."""
from .sources import ArraySource, ImageSource, SubsetSource, ConcatSource  # noqa: F401
from .builtin import load_fashion_mnist, load_digits, find_fashion_mnist  # noqa: F401
from .folder import ImageFolderSource  # noqa: F401
from .loader_torch import iter_batches  # noqa: F401
