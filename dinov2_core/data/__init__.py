"""Data: manifests of image URIs, robust image decoding, multi-crop augmentation, masking, collate, samplers."""
