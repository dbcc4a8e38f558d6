"""nvit-lightning: global structural pruning of Vision Transformers (NViT) with PyTorch Lightning."""

__version__ = "0.1.0"
