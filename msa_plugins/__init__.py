"""msa-plugins: Memory Sparse Attention (EverMind) memory for any Hugging Face causal LM, behind the
interfaces of LlamaIndex and LangChain."""

from .config import MSAConfig
from .core import GenerationResult, MSAEngine, QueryResult, QueryStream, RoutedDocument

__all__ = ["MSAEngine", "MSAConfig", "QueryResult", "QueryStream", "RoutedDocument", "GenerationResult"]
__version__ = "0.1.0"
