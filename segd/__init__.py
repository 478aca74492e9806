"""segd: on-device semantic segmentation daemon for Raspberry Pi + Coral Edge TPU."""

__version__ = "0.1.0"
