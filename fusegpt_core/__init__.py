"""FuseGPT: learnable fusion of transformer blocks, for Hugging Face decoder-only models."""

__version__ = "0.1.0"
