"""Segmentation models: one `build_<name>()` per module, each returning float32 logits."""
