"""The dataset fixtures of tests/fixture_writers.py have the releases' on-disk formats.

The writers are shared by the data, check and recipe tests; the tests here make sure the fixtures
really have the formats the releases have (palette PNGs, MATLAB files, soft mattes), so the
decoders are tested against the real thing.
"""

from __future__ import annotations

import numpy as np
import scipy.io
from PIL import Image

from seg_train.data import voc
from tests.fixture_writers import H, W, write_cihp, write_portrait, write_sbd, write_voc


def test_voc_fixture_masks_are_palette_pngs_with_255_borders(tmp_path):
    masks = write_voc(tmp_path, ["2007_000032"], ["2007_000033"])
    with Image.open(tmp_path / "SegmentationClass" / "2007_000032.png") as png:
        assert png.mode == "P"
        assert png.getpalette()[15 * 3 : 16 * 3] == voc.PALETTE[15]  # person
        assert png.convert("RGB").getpixel((0, 0)) != png.getpixel((0, 0))  # indices != colours
    assert 255 in masks["2007_000032"]
    with Image.open(tmp_path / "JPEGImages" / "2007_000032.jpg") as jpg:
        assert jpg.format == "JPEG" and jpg.size == (W, H)


def test_cihp_fixture_has_grey_ids_and_a_matlab_colormap(tmp_path):
    write_cihp(tmp_path, ["0000001"], ["0000002"])
    with Image.open(tmp_path / "Training" / "Category_ids" / "0000001.png") as png:
        assert png.mode == "L"
    colormap = scipy.io.loadmat(tmp_path / "human_colormap.mat")["colormap"]
    assert colormap.shape == (20, 3) and colormap.max() <= 1.0


def test_portrait_fixture_mattes_are_soft(tmp_path):
    mattes = write_portrait(tmp_path, 1, 1)
    matte = next(iter(mattes.values()))
    assert ((matte > 0) & (matte < 255)).any() and (matte == 0).any() and (matte == 255).any()


def test_sbd_fixture_reads_like_the_release(tmp_path):
    masks = write_sbd(tmp_path, ["2008_000002"], [])
    mat = scipy.io.loadmat(
        tmp_path / "cls" / "2008_000002.mat", squeeze_me=True, struct_as_record=False
    )
    np.testing.assert_array_equal(mat["GTcls"].Segmentation, masks["2008_000002"])
