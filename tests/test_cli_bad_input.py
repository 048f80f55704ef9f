"""The bad-input catalogue: the real CLI driven as a user would, with mistakes of every kind.

Every case asserts a non-zero exit, a single `seg-train: error:` line naming the culprit (and
saying what to do), no Python traceback, and that no earlier file changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_TRAIN, error_lines, run_cli

FOLDER = [
    "data=folder",
    "data.num_classes=2",
    "data.class_names=[bg,fg]",
    "debug=fast",
    "model.base_filters=4",
    "model.depth=3",
    "data.crop_size=[32,32]",
    "data.batch_size=2",
]


@dataclasses.dataclass
class World:
    """Files the cases refer to; none of them may change."""

    root: Path
    run: Path
    photos: Path

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return {
            str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in self.root.rglob("*")
            if p.is_file() and "new-runs" not in p.parts
        }


def folder_dataset(root: Path, masks: dict[str, np.ndarray | None], size=(32, 32)) -> Path:
    """A folder-layout dataset; a mask of None leaves the image without a mask."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for stem, mask in masks.items():
        Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(root / "images" / f"{stem}.png")
        if mask is not None:
            Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("\n".join(masks) + "\n")
    return root


def good_mask(size=(32, 32)) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[8:20, 8:20] = 1
    return mask


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir) -> World:
    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    result = run_cli([*TINY_TRAIN, f"hydra.run.dir={run}"], cache_dir, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photos / "ok.png")
    (root / "notes.txt").write_text("not an image")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "a_file").write_text("a file, not a directory")
    best = run / "checkpoints" / "best.keras"
    (root / "truncated.keras").write_bytes(best.read_bytes()[:300])
    inputs = keras.Input((32, 32, 3))
    keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs)).save(root / "three_classes.keras")
    (root / "empty_run").mkdir()
    preds = root / "preds"
    first = run_cli(
        [
            "mode=infer",
            f"ckpt_path={run}",
            f"infer.input={photos}",
            f"infer.output_dir={preds}",
            f"hydra.run.dir={root / 'infer0'}",
        ],
        cache_dir,
        cwd=root,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    mask = good_mask()
    folder_dataset(root / "no_masks", {"a": mask, "b": None})
    folder_dataset(root / "empty_split", {"a": mask})
    (root / "empty_split" / "splits" / "train.txt").write_text("\n")
    corrupt = folder_dataset(root / "corrupt_image", {"a": mask, "b": mask})
    (corrupt / "images" / "b.png").write_bytes(b"\x89PNG broken")
    mismatch = folder_dataset(root / "size_mismatch", {"a": mask, "b": mask})
    Image.fromarray(good_mask((24, 24))).save(mismatch / "masks" / "b.png")
    out_of_range = folder_dataset(root / "out_of_range", {"a": mask, "b": mask})
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(out_of_range / "masks" / "b.png")
    rgb = folder_dataset(root / "rgb_mask", {"a": mask, "b": mask})
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(rgb / "masks" / "b.png")
    binary = folder_dataset(root / "binary_0_255", {"a": mask * 255, "b": mask * 255})
    assert binary.is_dir()
    (root / "empty_images").mkdir()
    user_configs = root / "user_configs" / "experiment"
    user_configs.mkdir(parents=True)
    (user_configs / "typo.yaml").write_text("# @package _global_\ntrainer:\n  epoch: 3\n")
    (user_configs / "nested_typo.yaml").write_text(
        "# @package _global_\ndata:\n  source:\n    num_trian: 3\n"
    )
    (user_configs / "broken.yaml").write_text("# @package _global_\ntrainer:\n  epochs: [3\n")
    lying_data(root, mask)
    return World(root, run, photos)


def lying_data(root: Path, mask: np.ndarray) -> None:
    """Datasets whose files say one thing and are another (issue 19, item 6)."""
    jpeg_masks = folder_dataset(root / "jpeg_mask", {"a": mask, "b": mask})
    Image.fromarray(mask).save(jpeg_masks / "masks" / "b.png", format="JPEG")
    suffixed = folder_dataset(root / "suffix_in_split", {"a": mask, "b": mask})
    (suffixed / "splits" / "train.txt").write_text("a.png\nb.png\n")
    webp = folder_dataset(root / "webp_image", {"a": mask, "b": mask})
    (webp / "images" / "b.png").rename(webp / "images" / "b.webp")
    turned = folder_dataset(
        root / "exif_turned", {"a": good_mask((32, 48)), "b": mask}, size=(32, 48)
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees: 32x48 displayed, the mask is 48x32
    Image.fromarray(np.full((32, 48, 3), 90, np.uint8)).save(
        turned / "images" / "a.jpg", exif=exif.tobytes()
    )
    (turned / "images" / "a.png").unlink()


Args = Callable[[World], list[str]]
CASES: list[tuple[str, Args, list[str]]] = [
    # --- config: typos, types, missing values, contradictions -------------------------------
    ("unknown key", lambda w: ["trainer.epoch=3"], ["trainer.epoch", "epochs"]),
    ("wrong type", lambda w: ["data.batch_size=abc"], ["data.batch_size", "positive integer"]),
    ("unknown option", lambda w: ["model=nosuchmodel"], ["nosuchmodel", "unet"]),
    ("malformed override", lambda w: ["trainer.epochs"], ["trainer.epochs"]),
    ("float seed", lambda w: ["seed=1.5"], ["seed", "integer"]),
    ("eval without ckpt", lambda w: ["mode=eval"], ["ckpt_path"]),
    ("infer without ckpt", lambda w: ["mode=infer"], ["ckpt_path"]),
    ("infer without input", lambda w: ["mode=infer", f"ckpt_path={w.run}"], ["infer.input"]),
    ("folder without root", lambda w: ["data=folder"], ["data.root"]),
    ("classes contradict names", lambda w: ["data.num_classes=5"], ["data.class_names", "5"]),
    ("crop size shape", lambda w: ["data.crop_size=[128]"], ["data.crop_size"]),
    ("crop size for U-Net", lambda w: ["data.crop_size=[100,100]"], ["data.crop_size", "16"]),
    (
        "negative learning rate",
        lambda w: ["optimizer.learning_rate=-1"],
        ["optimizer.learning_rate"],
    ),
    ("scale range reversed", lambda w: ["data.scale_range=[2.0,1.0]"], ["data.scale_range"]),
    (
        "unknown precision",
        lambda w: [*TINY_TRAIN, "trainer.precision=float8"],
        ["trainer.precision"],
    ),
    ("unknown strategy", lambda w: [*TINY_TRAIN, "hardware.strategy=magic"], ["hardware.strategy"]),
    (
        "batch does not split",
        lambda w: [*TINY_TRAIN, "hardware.cpu_logical_devices=2", "data.batch_size=9"],
        ["data.batch_size=9", "replicas"],
    ),
    (
        "unknown TTA fusion",
        lambda w: ["mode=eval", f"ckpt_path={w.run}", "eval.tta.fusion=vote"],
        ["eval.tta.fusion"],
    ),
    (
        "resume a non-run",
        lambda w: [f"trainer.resume={w.root / 'empty_run'}"],
        ["empty_run", "not a training run dir"],
    ),
    # --- checkpoints ---------------------------------------------------------------------------
    (
        "missing checkpoint",
        lambda w: ["mode=eval", f"ckpt_path={w.root / 'nope'}"],
        ["nope", "does not exist"],
    ),
    (
        "truncated checkpoint",
        lambda w: ["mode=eval", f"ckpt_path={w.root / 'truncated.keras'}"],
        ["truncated.keras", "cannot load"],
    ),
    (
        "wrong class count",
        lambda w: ["mode=eval", f"ckpt_path={w.root / 'three_classes.keras'}"],
        ["3 classes", "data.num_classes is 4"],
    ),
    # Rules for what can never work: classes, labels and colours that uint8 masks cannot hold.
    (
        "duplicate class names",
        lambda w: ["data.class_names=[bg,bg,square,triangle]"],
        ["data.class_names", "'bg' twice"],
    ),
    ("more classes than uint8", lambda w: ["data.num_classes=300"], ["num_classes=300", "255"]),
    (
        "ignore label is a class id",
        lambda w: ["data.ignore_label=1"],
        ["data.ignore_label=1", "num_classes=4"],
    ),
    (
        "palette value above 255",
        lambda w: ["data.palette=[[0,0,0],[300,0,0],[0,1,0],[0,0,1]]"],
        ["data.palette[1]", "0..255"],
    ),
    # User config files (--config-dir): the command line's refusals, naming file and line.
    (
        "typo in an experiment file",
        lambda w: ["--config-dir", str(w.root / "user_configs"), "experiment=typo"],
        ["trainer.epoch", "typo.yaml", "epochs"],
    ),
    (
        "nested typo in an experiment file",
        lambda w: ["--config-dir", str(w.root / "user_configs"), "experiment=nested_typo"],
        ["data.source.num_trian", "nested_typo.yaml", "num_train"],
    ),
    (
        "YAML syntax error in a config file",
        lambda w: ["--config-dir", str(w.root / "user_configs"), "experiment=broken"],
        ["broken.yaml:4:1", "YAML", "line 3"],
    ),
    (
        "run dir without checkpoint",
        lambda w: ["mode=eval", f"ckpt_path={w.root / 'empty_run'}"],
        ["empty_run", "best.keras"],
    ),
    (
        "checkpoint not .keras",
        lambda w: ["mode=eval", f"ckpt_path={w.root / 'notes.txt'}"],
        ["notes.txt", ".keras"],
    ),
    # --- infer inputs and outputs ----------------------------------------------------------------
    (
        "infer input matches nothing",
        lambda w: ["mode=infer", f"ckpt_path={w.run}", f"infer.input={w.root}/*.tiff"],
        ["matches no image", "infer.input"],
    ),
    (
        "infer input not an image",
        lambda w: ["mode=infer", f"ckpt_path={w.run}", f"infer.input={w.root / 'notes.txt'}"],
        ["notes.txt"],
    ),
    (
        "infer input unreadable",
        lambda w: ["mode=infer", f"ckpt_path={w.run}", f"infer.input={w.root / 'corrupt.jpg'}"],
        ["corrupt.jpg", "cannot read image"],
    ),
    (
        "infer would overwrite",
        lambda w: [
            "mode=infer",
            f"ckpt_path={w.run}",
            f"infer.input={w.photos}",
            f"infer.output_dir={w.root / 'preds'}",
        ],
        ["already exists", "infer.overwrite", "infer.resume=true"],
    ),
    (
        "infer resume and overwrite",
        lambda w: [
            "mode=infer",
            f"ckpt_path={w.run}",
            f"infer.input={w.photos}",
            f"infer.output_dir={w.root / 'preds'}",
            "infer.resume=true",
            "infer.overwrite=true",
        ],
        ["infer.resume=true", "infer.overwrite=true", "only one"],
    ),
    (
        "infer into its input dir",
        lambda w: [
            "mode=infer",
            f"ckpt_path={w.run}",
            f"infer.input={w.photos}",
            f"infer.output_dir={w.photos}",
        ],
        ["input directory"],
    ),
    (
        "infer output under a file",
        lambda w: [
            "mode=infer",
            f"ckpt_path={w.run}",
            f"infer.input={w.photos}",
            f"infer.output_dir={w.root / 'a_file' / 'out'}",
        ],
        ["a_file", "infer.output_dir"],
    ),
    # --- run dirs ------------------------------------------------------------------------------
    (
        "run dir under a file",
        lambda w: ["debug=fast", f"hydra.run.dir={w.root / 'a_file' / 'r'}"],
        ["a_file"],
    ),
    (
        "reuse another run's dir",
        lambda w: ["seed=7", f"hydra.run.dir={w.run}"],
        ["run", "trainer.resume"],
    ),
    # --- data -----------------------------------------------------------------------------------
    (
        "data root missing",
        lambda w: [*FOLDER, f"data.root={w.root / 'no_such_data'}"],
        ["no_such_data"],
    ),
    (
        "data root without layout",
        lambda w: [*FOLDER, f"data.root={w.root / 'empty_images'}"],
        ["empty_images"],
    ),
    ("images without masks", lambda w: [*FOLDER, f"data.root={w.root / 'no_masks'}"], ["b.png"]),
    ("empty split", lambda w: [*FOLDER, f"data.root={w.root / 'empty_split'}"], ["train"]),
    ("corrupt image", lambda w: [*FOLDER, f"data.root={w.root / 'corrupt_image'}"], ["b.png"]),
    ("mask size mismatch", lambda w: [*FOLDER, f"data.root={w.root / 'size_mismatch'}"], ["b.png"]),
    ("labels out of range", lambda w: [*FOLDER, f"data.root={w.root / 'out_of_range'}"], ["7"]),
    ("RGB colour mask", lambda w: [*FOLDER, f"data.root={w.root / 'rgb_mask'}"], ["b.png"]),
    (
        "0/255 binary mask",
        lambda w: [*FOLDER, f"data.root={w.root / 'binary_0_255'}"],
        ["255", "'data.label_map={255:1}'"],
    ),
    (
        "label map out of range",
        lambda w: [*FOLDER, f"data.root={w.root / 'binary_0_255'}", "data.label_map={256:1}"],
        ["data.label_map must map mask values 0..255"],
    ),
    (
        "mask threshold out of range",
        lambda w: [*FOLDER, f"data.root={w.root / 'binary_0_255'}", "data.mask_threshold=300"],
        ["data.mask_threshold", "0..254"],
    ),
    # --- a dataset group without data.root: where it comes from and how to prepare it -------
    (
        "cihp without root",
        lambda w: ["model=deeplabv3plus", "data=cihp"],
        ["data=cihp needs data.root", "lip.sysuhcp.com", "Training/", "prepare_data.sh cihp DIR"],
    ),
    (
        "voc without root",
        lambda w: ["data=voc"],
        ["VOCtrainval_11-May-2012.tar", "JPEGImages/", "prepare_data.sh voc DIR"],
    ),
    (
        "pets raw without root",
        lambda w: ["data=oxford_pets", "data.format=raw"],
        ["annotations/trimaps/", "prepare_data.sh pets DIR", "data.format=tfds"],
    ),
    # --- data that lies (file contents, split files) and large-image settings -----------------
    (
        "JPEG mask named .png",
        lambda w: [*FOLDER, f"data.root={w.root / 'jpeg_mask'}"],
        ["masks/b.png", "JPEG"],
    ),
    (
        "suffix in split file",
        lambda w: [*FOLDER, f"data.root={w.root / 'suffix_in_split'}"],
        ["'a.png' is listed with its suffix", "'a'"],
    ),
    (
        "unsupported image suffix",
        lambda w: [*FOLDER, f"data.root={w.root / 'webp_image'}"],
        ["b.webp", ".jpg, .jpeg, .png, .bmp"],
    ),
    (
        "EXIF-turned photo",
        lambda w: [*FOLDER, f"data.root={w.root / 'exif_turned'}"],
        ["masks/a.png", "EXIF orientation 6"],
    ),
    (
        "slide batch of zero",
        lambda w: ["mode=eval", f"ckpt_path={w.run}", "eval.batch_size=0"],
        ["eval.batch_size"],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, args, expected, world, cache_dir):
    before = world.snapshot()
    new_run = world.root / "new-runs" / name.replace(" ", "_").replace("/", "_")
    extra = (
        []
        if any(a.startswith("hydra.run.dir=") for a in args(world))
        else [f"hydra.run.dir={new_run}"]
    )
    result = run_cli([*args(world), *extra], cache_dir, cwd=world.root)
    assert result.returncode != 0, f"{name}: accepted\n{result.stdout[-2000:]}"
    lines = error_lines(result)
    assert len(lines) == 1, f"{name}: {lines}"
    assert lines[0].startswith("seg-train: error: ")
    for fragment in expected:
        assert fragment in lines[0], f"{name}: {fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in result.stderr
    assert world.snapshot() == before, f"{name}: an earlier file changed"


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


def test_full_traceback_on_request(cache_dir, tmp_path):
    result = run_cli(
        ["data.batch_size=abc", f"hydra.run.dir={tmp_path / 'run'}"],
        cache_dir,
        cwd=tmp_path,
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
