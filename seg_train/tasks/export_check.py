"""Runs an exported SavedModel or TFLite file on saved images, in a process of its own.

`seg-train mode=export` calls this as `python -m seg_train.tasks.export_check ARTEFACT --format=F
--images=IN.npz --output=OUT.npz` to check the export the way a server or phone would see it:
only TensorFlow (or the TFLite interpreter) and NumPy are imported here, never Keras models or
this package's layers, so a result proves the artefact is self-contained.

IN.npz holds uint8 images [H, W, 3] under the keys `image_00000`, `image_00001`, ...; OUT.npz
receives their uint8 class ids [H, W] under `ids_00000`, `ids_00001`, ... (a matting export's
float32 alpha [H, W] instead, under the same keys).
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# Must match seg_train.tasks.export (not imported: it would pull in Keras and the models).
SIGNATURE = "serving_default"
INPUT_NAME = "images"
IDS_NAME = "class_ids"
ALPHA_NAME = "alpha"  # seg_train.tasks.export_matting


def saved_model_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function image [H, W, 3] -> class ids [H, W] using the SavedModel's serving signature."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures[SIGNATURE]

    def run(image: np.ndarray) -> np.ndarray:
        outputs = signature(**{INPUT_NAME: tf.constant(image[None])})
        return outputs[ALPHA_NAME if ALPHA_NAME in outputs else IDS_NAME].numpy()[0]

    return run


def tflite_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function image [H, W, 3] -> class ids [H, W] using the TFLite file's signature."""
    try:  # LiteRT is the interpreter's new home; TensorFlow's copy is deprecated but present.
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice of tf.lite.Interpreter
        interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(SIGNATURE)
    expected = tuple(runner.get_input_details()[INPUT_NAME]["shape"][1:3])

    def run(image: np.ndarray) -> np.ndarray:
        if tuple(image.shape[:2]) != expected:
            raise ValueError(f"image size {image.shape[:2]} != the TFLite input size {expected}")
        return runner(**{INPUT_NAME: image[None]})[IDS_NAME][0]

    return run


RUNNERS = {"saved_model": saved_model_runner, "tflite": tflite_runner}


def main(argv: Sequence[str] | None = None) -> None:
    """Predicts class ids for every image of --images with the artefact; writes --output."""
    parser = argparse.ArgumentParser(
        prog="python -m seg_train.tasks.export_check", description=__doc__
    )
    parser.add_argument("artefact", type=Path, help="SavedModel dir or .tflite file")
    parser.add_argument("--format", choices=sorted(RUNNERS), required=True)
    parser.add_argument("--images", type=Path, required=True, help=".npz of uint8 images")
    parser.add_argument("--output", type=Path, required=True, help=".npz for the class ids")
    args = parser.parse_args(argv)
    # Quiet TensorFlow's C++ start-up logging; set before TensorFlow is imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    predict = RUNNERS[args.format](args.artefact)
    results = {}
    with np.load(args.images) as images:
        for key in sorted(images.files):
            ids = np.asarray(predict(images[key]))
            if ids.dtype not in (np.uint8, np.float32):
                raise TypeError(
                    f"{args.artefact} returned {ids.dtype}, not uint8 ids or a float32 alpha"
                )
            results[key.replace("image_", "ids_", 1)] = ids
    np.savez(args.output, **results)
    print(f"export_check: {args.format} {args.artefact} predicted {len(results)} images")


if __name__ == "__main__":
    main()
