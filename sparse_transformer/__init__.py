"""sparse-transformer: the Sparse Transformer (Child et al. 2019) as fast, exact PyTorch software."""
from . import layouts
from .attention import sparse_attention

__all__ = ["layouts", "sparse_attention"]
__version__ = "0.1.0"
