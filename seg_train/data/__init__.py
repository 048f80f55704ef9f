"""Datasets: one decoder module per dataset, and the one shared parser in `pipeline.py`.

A dataset module only *decodes*: its source (see `base.py` for the interface) lists a split's
records and turns one record into a uint8 RGB image [H, W, 3] and a uint8 class-id mask [H, W]
(255 = ignore), and the module exports its class names and palette. Scaling, cropping,
flipping, jitter, padding and batching happen in `pipeline.py` for every dataset alike.

    folder.py       the generic images/ + masks/ + splits/ layout
    synthetic.py    the embedded default dataset (generated into the folder layout)
    voc.py          PASCAL VOC 2012 (+ SBD aug)
    cihp.py         CIHP human parsing (left/right flip pairs)
    portrait.py     the portrait matting set (mattes binarised)
    oxford_pets.py  Oxford-IIIT Pet, from TFDS or the release files
"""
