"""Segmentation models: one `build_<name>()` per module, each returning float32 logits.

Importing the package registers the custom layers (`seg_train.models.layers`), which
`keras.saving.load_model` needs to rebuild saved models in safe mode.
"""

from seg_train.models import layers  # noqa: F401  (registers custom layers for deserialisation)
