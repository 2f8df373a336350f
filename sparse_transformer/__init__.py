"""sparse-transformer: the Sparse Transformer (Child et al. 2019) as fast, exact PyTorch software."""
from . import layouts
from .attention import sparse_attention
from .model import SparseTransformer, SparseTransformerConfig
from .presets import load_preset

__all__ = ["layouts", "sparse_attention", "SparseTransformer", "SparseTransformerConfig", "load_preset"]
__version__ = "0.1.0"
