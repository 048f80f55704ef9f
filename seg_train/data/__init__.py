"""Datasets: one decoder module per dataset, and the one shared parser in `pipeline.py`.

A dataset module only *decodes*: its source (see `base.py` for the interface) lists a split's
records and turns one record into a uint8 RGB image [H, W, 3] and a uint8 class-id mask [H, W]
(255 = ignore), and the module exports its class names and palette. Scaling, cropping,
flipping, jitter, padding and batching happen in `pipeline.py` for every dataset alike. Nothing
here reads the config: the tasks build the source and a `PipelineOptions` from `cfg.data`
(`seg_train.tasks.sources`) and pass them in.

The shared machinery, from the bottom up:

    readers.py      Pillow readers (read_image, read_mask, EXIF orientation), DataError,
                    Example, Pair, split lists (read_id_list, pair_ids, slice_ids, hints),
                    the user's label remap table (remap_table), label_counts
    base.py         the decoder interface: Source, and FileSource for datasets of files
    decode.py       record -> pair: in-graph JPEG/PNG decode, the Pillow fallback op,
                    data.on_error=skip counting, data_errors_as_user_errors
    options.py      PipelineOptions: the data.* settings the pipeline reads
    augment.py      the training transform: scaled crop or resize, flip (flip_table),
                    colour jitter, padding (pad_colour, pad_image)
    matting.py      the same transform for alpha-matte targets
    pipeline.py     decoded_dataset, train_dataset, val_dataset, the cache policy
    stats.py        the split scan (scan_split, Tally, check_record) and
                    median_frequency_weights, shared by mode=check and class_weights=auto

The datasets:

    folder.py       the generic images/ + masks/ + splits/ layout
    synthetic.py    the embedded default dataset (generated into the folder layout)
    voc.py          PASCAL VOC 2012 (+ SBD aug)
    cihp.py         CIHP human parsing (left/right flip pairs)
    portrait.py     the portrait matting set (mattes binarised)
    oxford_pets.py  Oxford-IIIT Pet, from TFDS or the release files
"""
