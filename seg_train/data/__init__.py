"""Datasets: one decoder module per dataset, and the one shared parser in `pipeline.py`.

A dataset module only *decodes*: it lists a split's examples and turns one example into a uint8
RGB image [H, W, 3] and a uint8 class-id mask [H, W] (255 = ignore). Scaling, cropping,
flipping, padding and batching happen in `pipeline.py` for every dataset alike.
"""
