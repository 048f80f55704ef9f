"""seg-train: config-driven semantic segmentation training on TensorFlow / Keras 3."""

__version__ = "0.1.0"
