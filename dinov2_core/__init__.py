"""dinov2_core: a pure-PyTorch implementation of the DINOv2 recipe.

Backbones, heads, losses, multi-crop data, the FSDP2 self-distillation trainer and frozen-feature
evaluation. Importing this package needs only torch, torchvision, numpy and pillow; optional
dependencies (pyyaml for config files, pyarrow for Parquet manifests, s3fs for ``s3://`` URIs) are
imported only by the functions that need them.
"""

__version__ = "0.1.0"
