"""Fully Convolutional Networks for semantic segmentation, in pure PyTorch."""

IGNORE_INDEX = 255
"""Label value of pixels excluded from loss and metrics (VOC's boundary and void label)."""
