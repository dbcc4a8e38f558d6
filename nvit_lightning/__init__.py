"""nvit-lightning: global structural pruning of Vision Transformers (NViT) with PyTorch Lightning."""

__version__ = "0.1.0"

# registers this package's timm architectures, so after `import nvit_lightning` a saved model loads
# with `timm.create_model("local-dir:<dir>", pretrained=True)`
from . import models  # noqa: F401
