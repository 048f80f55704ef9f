"""Writers of tiny datasets in their genuine on-disk layouts and file formats, for tests.

PASCAL VOC 2012 (+ SBD), CIHP, the portrait matting set, Oxford-IIIT Pet (raw release and mocked
TFDS) and the generic folder layout. tests/test_data_layouts.py checks that these fixtures really
have the formats the releases have (palette PNGs, MATLAB files, soft mattes, trimaps), so the
decoders are tested against the real thing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from seg_train.data import cihp
from seg_train.data.folder import FolderSource
from seg_train.viz import voc_palette

# Tiny images: width 40, height 30 (not square, so transposed axes would show).
H, W = 30, 40


def blocky_labels(rng: np.random.Generator, values, shape=(H, W), block=5) -> np.ndarray:
    """A label map of `block`-pixel squares with labels drawn from `values`."""
    grid = rng.choice(np.asarray(values), size=(-(-shape[0] // block), -(-shape[1] // block)))
    return np.kron(grid, np.ones((block, block), dtype=int))[: shape[0], : shape[1]].astype(
        np.uint8
    )


def with_ignore_borders(mask: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Marks pixels next to another class as `ignore`, as VOC's object outlines are."""
    out = mask.copy()
    edge = np.zeros(mask.shape, bool)
    vertical, horizontal = mask[1:] != mask[:-1], mask[:, 1:] != mask[:, :-1]
    edge[1:] |= vertical
    edge[:, 1:] |= horizontal
    out[edge] = ignore
    return out


def photo(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """An RGB image loosely following the mask (so a model has something to learn)."""
    base = (mask.astype(np.int32) * 37 % 256)[..., None] + rng.integers(0, 40, (*mask.shape, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def save_palette_png(path: Path, ids: np.ndarray) -> None:
    """Writes ids as a mode-P PNG carrying the 256-entry VOC palette, as the VOC release does."""
    image = Image.fromarray(ids)
    image.putpalette(voc_palette(256).tobytes())
    image.save(path)


# --- PASCAL VOC 2012 ---------------------------------------------------------------------------


def write_voc(root: Path, train_ids, val_ids, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}; returns the masks."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    masks = {}
    for image_id in [*train_ids, *val_ids]:
        mask = with_ignore_borders(blocky_labels(rng, [0, 0, 1, 8, 15, 20]))
        Image.fromarray(photo(rng, mask)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        masks[image_id] = mask
    lists = {"train": train_ids, "val": val_ids, "trainval": [*train_ids, *val_ids]}
    for name, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return masks


def write_sbd(root: Path, train_ids, val_ids, seed: int = 1) -> dict[str, np.ndarray]:
    """Writes benchmark_RELEASE/dataset/{img, cls/*.mat (GTcls), train.txt, val.txt}."""
    rng = np.random.default_rng(seed)
    (root / "cls").mkdir(parents=True)
    (root / "img").mkdir()
    masks = {}
    for image_id in [*train_ids, *val_ids]:
        mask = blocky_labels(rng, [0, 3, 12, 20])  # SBD has no 255 borders
        Image.fromarray(photo(rng, mask)).save(root / "img" / f"{image_id}.jpg", quality=95)
        boundaries = np.empty((20, 1), dtype=object)
        boundaries[:] = [[np.zeros((2, 2))] for _ in range(20)]
        gtcls = {
            "Segmentation": mask,
            "Boundaries": boundaries,
            "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8),
        }
        scipy.io.savemat(root / "cls" / f"{image_id}.mat", {"GTcls": gtcls})
        masks[image_id] = mask
    (root / "train.txt").write_text("\n".join(train_ids) + "\n")
    (root / "val.txt").write_text("\n".join(val_ids) + "\n")
    return masks


# --- CIHP ----------------------------------------------------------------------------------------


def write_cihp(
    root: Path, train_ids, val_ids, seed: int = 0, colormap=None
) -> dict[str, np.ndarray]:
    """Writes instance-level_human_parsing/{Training,Validation} and human_colormap.mat."""
    rng = np.random.default_rng(seed)
    masks = {}
    for folder, id_file, ids in (
        ("Training", "train_id.txt", train_ids),
        ("Validation", "val_id.txt", val_ids),
    ):
        (root / folder / "Images").mkdir(parents=True)
        (root / folder / "Category_ids").mkdir()
        for image_id in ids:
            mask = blocky_labels(rng, list(range(cihp.NUM_CLASSES)))
            Image.fromarray(photo(rng, mask)).save(root / folder / "Images" / f"{image_id}.jpg")
            Image.fromarray(mask, mode="L").save(root / folder / "Category_ids" / f"{image_id}.png")
            masks[image_id] = mask
        (root / folder / id_file).write_text("\n".join(ids) + "\n")
    colours = np.asarray(cihp.PALETTE if colormap is None else colormap, dtype=np.float64)
    scipy.io.savemat(root / "human_colormap.mat", {"colormap": colours / 255.0})
    return masks


# --- Portrait matting set ------------------------------------------------------------------------


def soft_matte(rng: np.random.Generator) -> np.ndarray:
    """An alpha matte: 0 outside an ellipse, 255 inside, a soft ramp of partial alpha between."""
    yy, xx = np.mgrid[0:H, 0:W]
    cy, cx = rng.uniform(10, 20), rng.uniform(12, 28)
    distance = np.sqrt(((yy - cy) / 9.0) ** 2 + ((xx - cx) / 11.0) ** 2)
    return (np.clip((1.3 - distance) / 0.6, 0, 1) * 255).round().astype(np.uint8)


def write_portrait(
    root: Path, num_train: int, num_test: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Writes <root>/{training,testing}/NNNNN.png + NNNNN_matte.png; returns mattes by path."""
    rng = np.random.default_rng(seed)
    mattes = {}
    index = 1
    for folder, count in (("training", num_train), ("testing", num_test)):
        (root / folder).mkdir(parents=True)
        for _ in range(count):
            matte = soft_matte(rng)
            stem = f"{index:05d}"
            Image.fromarray(photo(rng, (matte > 0).astype(np.uint8))).save(
                root / folder / f"{stem}.png"
            )
            Image.fromarray(matte, mode="L").save(root / folder / f"{stem}_matte.png")
            mattes[str(root / folder / f"{stem}.png")] = matte
            index += 1
    return mattes


# --- Oxford-IIIT Pet -----------------------------------------------------------------------------

BREEDS = (("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 6, 1))


def pet_names(count: int, offset: int = 0) -> list[str]:
    return [f"{BREEDS[i % 3][0]}_{offset + i + 1}" for i in range(count)]


def write_pets_raw(root: Path, train_names, test_names, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes <root>/{images/*.jpg, annotations/{trimaps/*.png, trainval.txt, test.txt}}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    trimaps = {}
    for list_name, names in (("trainval.txt", train_names), ("test.txt", test_names)):
        lines = []
        for name in names:
            trimap = blocky_labels(rng, [1, 2, 2, 3])
            Image.fromarray(photo(rng, trimap)).save(root / "images" / f"{name}.jpg")
            Image.fromarray(trimap, mode="L").save(root / "annotations" / "trimaps" / f"{name}.png")
            breed = next(b for b in BREEDS if name.startswith(b[0]))
            lines.append(f"{name} {breed[1]} {breed[2]} 1")
            trimaps[name] = trimap
        (root / "annotations" / list_name).write_text("\n".join(lines) + "\n")
    return trimaps


def pets_tfds_examples(count: int, seed: int) -> list[dict]:
    """Examples with the features of TFDS `oxford_iiit_pet` (trimaps 1..3)."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)
    examples = []
    for name in pet_names(count, offset=100 * seed):
        trimap = blocky_labels(rng, [1, 2, 2, 3])
        examples.append(
            {
                "image": photo(rng, trimap),
                "label": 0,
                "species": 0,
                "file_name": f"{name}.jpg",
                "segmentation_mask": trimap[..., None],
                "head_bbox": tfds.features.BBox(0.1, 0.1, 0.9, 0.9),
            }
        )
    return examples


def mock_pets(examples_by_split: dict[str, list[dict]]):
    """`tfds.testing.mock_data` serving `examples_by_split` as oxford_iiit_pet's splits.

    The examples are encoded and decoded with the builder's own features, as records read
    from a prepared dataset are.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        examples = examples_by_split[str(split).split("[")[0]]
        features = self.info.features
        signature = tf.nest.map_structure(
            lambda t: tf.TensorSpec(t.shape, t.dtype), features.get_serialized_info()
        )
        encoded = tf.data.Dataset.from_generator(
            lambda: (features.encode_example(ex) for ex in examples), output_signature=signature
        )
        encoded = encoded.apply(tf.data.experimental.assert_cardinality(len(examples)))
        return encoded.map(functools.partial(features.decode_example, decoders=decoders))

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


# --- The folder layout (images/, masks/, splits/) -----------------------------------------------


def write_folder_dataset(root, masks, images=None):
    """Writes masks (and images) in the folder layout; all stems go to both splits."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for i, mask in enumerate(masks):
        stem = f"im{i}"
        image = images[i] if images is not None else np.stack([mask] * 3, -1)
        Image.fromarray(image.astype(np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{stem}.png")
        stems.append(stem)
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems))
    return FolderSource(str(root))


def blocky_mask(rng, shape, labels):
    """A mask of 4x4 blocks with random labels from `labels`."""
    blocks = rng.choice(labels, size=(shape[0] // 4, shape[1] // 4))
    return np.kron(blocks, np.ones((4, 4), dtype=int))
