"""One measurement per process, so each peak RSS belongs to one measurement.

Usage (run_all.py does this): python benchmarks/worker.py KIND JSON_SPEC -> one JSON line on
stdout. KIND is input | train | infer | crf | matmul. Every timing is taken after warm-up, over
`steps` steps (or batches / images), with `time.perf_counter`.

Train variants: "bare" (the recipe's model, its Keras optimizer, plain cross-entropy, no
metrics or callbacks), "ours" (seg-train's compile path and callbacks) and "source" (the
source's own model and `compile`, from benchmarks/baselines.py, spec["source"]). All three
run `model.fit` on the same in-memory batch and report `train_gflops_per_image` (see
`train_gflops_per_image`) and `gflops_per_s`. The model is built under the config's
`trainer.precision` (Keras' global dtype policy, as `seg-train` sets it), e.g.
`trainer.precision=mixed_bfloat16` in the overrides.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The product's settings (seg_train.runtime.prepare_environment), before TensorFlow loads.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def peak_rss_mb() -> float:
    """Peak resident memory of this process or its largest child, e.g. a CRF worker (KiB)."""
    return (
        max(
            resource.getrusage(who).ru_maxrss
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        )
        / 1024
    )


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when this worker process exits (one per measurement)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def compose(overrides: list[str]):
    """The composed Hydra config of a recipe, without Hydra's runtime (no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base=None):
        return hydra_compose("config", overrides=overrides)


# ----- input pipeline ------------------------------------------------------------------------
def timed(step, min_steps: int, min_seconds: float, max_steps: int = 100_000) -> tuple:
    """Calls `step()` until both `min_steps` calls and `min_seconds` have passed.

    Returns:
        (calls, seconds): how many calls were timed and how long they took in all.
    """
    calls, start = 0, time.perf_counter()
    while calls < max_steps:
        step()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_steps and elapsed >= min_seconds:
            break
    return calls, elapsed


def _file_pairs(source):
    """The split's (image path, mask path) pairs as a dataset, for the reference pipelines."""
    import tensorflow as tf

    examples = source.examples("train")
    return tf.data.Dataset.from_tensor_slices(
        ([e.image_path for e in examples], [e.mask_path for e in examples])
    )


def _naive(files, crop, batch):
    """The tutorials' pipeline: read_file -> decode -> resize -> batch, no parallel map, no
    prefetch. Like the tutorials it reads palette PNGs through tf.io (grey levels of the
    palette colours, not class ids): a speed reference only, its labels are wrong."""
    import tensorflow as tf

    def load(image_path, mask_path):
        image = tf.io.decode_jpeg(tf.io.read_file(image_path), channels=3)
        mask = tf.io.decode_png(tf.io.read_file(mask_path), channels=1)
        image = tf.image.resize(image, crop)
        mask = tf.image.resize(mask, crop, method="nearest")
        return image, mask

    return files.repeat().map(load).batch(batch)


def bench_input(spec: dict) -> dict:
    import tensorflow as tf
    from omegaconf import OmegaConf

    from seg_train.data import pipeline
    from seg_train.data.options import PipelineOptions

    data = OmegaConf.create(spec["data"])
    batch, crop = data.batch_size, list(data.crop_size)
    variant = spec["variant"]
    if spec["layout"] == "voc":
        from seg_train.data.voc import VOCSource

        source = VOCSource(spec["root"], num_classes=21)
    else:
        from seg_train.data.folder import FolderSource

        source = FolderSource(spec["root"], num_classes=21)
    if variant in ("ours", "ours_no_cache"):
        # ours: the defaults (data.cache=auto, which caches these few files); ours_no_cache:
        # every epoch decodes, as on a dataset too large to cache.
        if variant == "ours_no_cache":
            data.cache = False
        options = PipelineOptions.from_mapping(OmegaConf.to_container(data, resolve=True))
        dataset = pipeline.train_dataset(source, options, seed=0, repeat=True)
    elif variant == "ours_decode":
        # Our decode alone (in-graph decode + checks, Pillow fallback), single images.
        dataset = pipeline.decoded_dataset(source, "train").repeat()
        batch = 1
    elif variant == "decode_only":
        # TensorFlow's own decoders, parallel, nothing else: the practical ceiling of any
        # pipeline over these files (single images). tf.io reads palette PNGs as grey levels
        # of the colours: a speed reference only.
        files = _file_pairs(source)
        dataset = (
            files.repeat()
            .map(
                lambda image_path, mask_path: (
                    tf.io.decode_jpeg(tf.io.read_file(image_path), channels=3),
                    tf.io.decode_png(tf.io.read_file(mask_path), channels=1),
                ),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            .prefetch(tf.data.AUTOTUNE)
        )
        batch = 1
    elif variant == "naive":
        dataset = _naive(_file_pairs(source), crop, batch)
    elif variant == "naive_sequential":
        # The same, as the tutorials meant it: tf.data's default optimisations parallelise a
        # stateless map and add a prefetch by themselves; here both are switched off.
        options = tf.data.Options()
        options.experimental_optimization.map_parallelization = False
        options.experimental_optimization.inject_prefetch = False
        dataset = _naive(_file_pairs(source), crop, batch).with_options(options)
    else:
        raise ValueError(variant)
    # Warm-up: shuffle buffer filled, threads started, autotune settled, and (for a cached
    # pipeline) the first epoch, which fills the cache, done.
    iterator = iter(dataset)
    warmup = spec["warmup"] * (data.batch_size if batch == 1 else 1)
    if variant == "ours":
        warmup = max(warmup, source.num_examples("train") // batch + 2)
    for _ in range(warmup):
        next(iterator)
    calls, seconds = timed(lambda: next(iterator), spec["steps"], spec["min_seconds"])
    return {"images_per_s": calls * batch / seconds, "seconds": seconds, "steps": calls}


# ----- training ------------------------------------------------------------------------------
class _StepTimer:
    """Wall-clock stamps at each batch end; steady-state time per step after warm-up."""

    def __init__(self, warmup: int):
        import keras

        timer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                timer.stamps.append(time.perf_counter())

        self.warmup = warmup
        self.stamps: list[float] = []
        self.callback = Callback()

    def stop_when(self, min_steps: int, min_seconds: float):
        """A callback ending `fit` once `min_steps` steps and `min_seconds` are measured."""
        import keras

        timer = self

        class Stop(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                measured = timer.stamps[timer.warmup - 1 :]
                if len(measured) > min_steps and measured[-1] - measured[0] >= min_seconds:
                    self.model.stop_training = True

        return Stop()

    def seconds_per_step(self) -> float:
        """The median interval between batch ends: one step slowed by another process on a
        shared machine does not move it."""
        import numpy as np

        return float(np.median(np.diff(self.stamps[self.warmup - 1 :])))

    @property
    def measured_steps(self) -> int:
        return len(self.stamps) - self.warmup


def _synthetic_batch(crop, batch, classes):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, *crop, 3)).astype(np.float32)
    labels = rng.integers(0, classes, (batch, *crop)).astype(np.uint8)
    return images, labels


def bench_train(spec: dict) -> dict:
    import keras
    import tensorflow as tf
    from hydra.utils import instantiate

    from seg_train.data import pipeline
    from seg_train.tasks.sources import pipeline_options
    from seg_train.training import backup, distribute, fit
    from seg_train.training.callbacks import BackupCallback, DataStallMonitor, NaNGuard

    out = scratch_dir("seg-bench-")
    cfg = compose(
        spec["overrides"]
        + [
            f"paths.output_dir={out}",
            f"paths.cache_dir={out}",
            f"trainer.jit_compile={spec['jit']}",
        ]
    )
    # Before any layer is built, as train.py does: float32, mixed_float16 or mixed_bfloat16.
    distribute.set_precision(cfg.trainer.precision)
    keras.utils.set_random_seed(0)
    crop, batch = list(cfg.data.crop_size), cfg.data.batch_size
    images, labels = _synthetic_batch(crop, batch, min(cfg.data.num_classes, 3))
    # One batch in memory, repeated: the model is measured, not the disk.
    tensors = tf.data.Dataset.from_tensors((images, labels)).repeat()
    warmup, steps, min_seconds = spec["warmup"], spec["steps"], spec["min_seconds"]
    timer = _StepTimer(warmup)
    if spec["variant"] == "source":
        # The source's own network, written from its text (no seg_train code), at the
        # recipe's crop and class count.
        from benchmarks import baselines

        if crop[0] != crop[1]:
            raise ValueError(f"the sources' models take square inputs, not {crop}")
        model = baselines.BUILDERS[spec["source"]](num_classes=cfg.data.num_classes, size=crop[0])
    else:
        model = instantiate(cfg.model, _convert_="all")
    result = {"params": model.count_params(), "precision": cfg.trainer.precision}
    stall_monitor = None
    if spec["variant"] == "source":
        # The source's compile, word for word; its fit has no callbacks but our timer's.
        baselines.compile_like_source(model, spec["source"])
        result["source"] = spec["source"]
        train_model, callbacks = model, [timer.callback, timer.stop_when(steps, min_seconds)]
    elif spec["variant"] == "bare":
        # The recipe's own Keras optimizer (same class and settings) without our parameter
        # groups, schedule and decay; plain cross-entropy (L1 on a matting recipe's alpha); no
        # metrics, no callbacks.
        optimizer = instantiate(cfg.optimizer.inner, learning_rate=cfg.optimizer.learning_rate)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        if cfg.data.get("task") == "matting":
            loss = keras.losses.MeanAbsoluteError()
            tensors = tensors.map(lambda x, y: (x, tf.cast(y, tf.float32)[..., None] / 2.0))
        model.compile(optimizer=optimizer, loss=loss, jit_compile=spec["jit"])
        train_model, callbacks = model, [timer.callback, timer.stop_when(steps, min_seconds)]
    else:
        # Our path, as train.py runs it: parameter groups, loss, mean IoU, every default
        # callback (checkpoint, CSV, TensorBoard, prediction images, data stall), NaN guard,
        # backups.
        from seg_train.tasks import instantiate as builders
        from seg_train.training.multiscale import TrainingView

        # `without` takes pieces out one at a time, to find what a step pays for (an
        # ablation; the product always runs with all of them).
        without = set(spec.get("without", []))
        view = TrainingView.of(model)
        run_steps = warmup + spec["max_steps"]
        if "param_groups" in without:  # the recipe's Keras optimizer alone
            optimizer = instantiate(cfg.optimizer.inner, learning_rate=cfg.optimizer.learning_rate)
        else:
            optimizer = instantiate(
                cfg.optimizer,
                total_steps=cfg.trainer.epochs * run_steps,
                steps_per_epoch=run_steps,
            )
        if "loss" in without:  # Keras' cross-entropy: no ignore-label mask, no weights
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        else:
            loss = instantiate(
                builders.resolve_class_weights(cfg.loss, lambda: [1.0] * cfg.data.num_classes)
            )
        fit.compile_model(
            view,
            optimizer,
            loss,
            [] if "metrics" in without else builders.fit_metrics(cfg),
            jit_compile=cfg.trainer.jit_compile,
            steps_per_execution=cfg.trainer.steps_per_execution,
        )
        train_model = view.train_model
        callbacks = [NaNGuard("bench")]
        callbacks += builders.build_callbacks(cfg, (images[:2], labels[:2]), view)
        if "callbacks" in without:
            callbacks = []
        checkpoint = next(
            (c for c in callbacks if isinstance(c, keras.callbacks.ModelCheckpoint)), None
        )
        if "callbacks" not in without:
            callbacks.append(
                BackupCallback(
                    out, cfg.trainer.backup_every_steps, checkpoint, backup.TrainingState()
                )
            )
        callbacks += [timer.callback, timer.stop_when(steps, min_seconds)]
        stall_monitor = next((c for c in callbacks if isinstance(c, DataStallMonitor)), None)
        tensors = view.wrap_dataset(tensors)
    gpu = tf.config.list_logical_devices("GPU")
    if gpu:  # peak GPU memory of this run's steps (scripts/gpu_check.sh)
        tf.config.experimental.reset_memory_stats(gpu[0].name)
    train_model.fit(
        tensors,
        epochs=1,
        steps_per_epoch=warmup + spec["max_steps"],
        callbacks=callbacks,
        verbose=0,
    )
    seconds = timer.seconds_per_step()
    if gpu:
        result["peak_gpu_mb"] = tf.config.experimental.get_memory_info(gpu[0].name)["peak"] / 2**20
    result.update(
        seconds_per_step=seconds,
        images_per_s=batch / seconds,
        crop=crop,
        batch=batch,
        steps=timer.measured_steps,
    )
    try:
        gflops = train_gflops_per_image(model, crop)
    except Exception as error:  # noqa: BLE001 - a count that fails must not lose the timing
        gflops, result["gflops_error"] = None, f"{type(error).__name__}: {error}"[:200]
    result["train_gflops_per_image"] = gflops
    result["gflops_per_s"] = None if gflops is None else gflops * result["images_per_s"]
    if stall_monitor is not None and spec.get("stall_root") and not spec["jit"]:
        # The data stall with the real input pipeline at the recipe's crop and batch, on the
        # generated VOC-layout files.
        from seg_train.data.voc import VOCSource

        source = VOCSource(spec["stall_root"], num_classes=21)
        real = pipeline.train_dataset(source, pipeline_options(cfg), seed=0, repeat=True)
        real = TrainingView.of(model).wrap_dataset(real)
        train_model.fit(
            real,
            epochs=2,
            initial_epoch=1,
            steps_per_epoch=spec["stall_steps"],
            callbacks=[stall_monitor],
            verbose=0,
        )
        result["data_stall"] = stall_monitor.history[-1] if stall_monitor.history else None
    return result


def train_gflops_per_image(model, crop) -> float:
    """Floating-point operations of one training step on one image, in GFLOP, from the graph.

    Traces (never runs) a `tf.function` of: the network's forward pass in training mode on a
    1 x H x W x 3 batch, SparseCategoricalCrossentropy(from_logits=True) against 1 x H x W
    labels, and the gradients of the loss with respect to `model.trainable_variables`; then
    sums, over that graph's operations, TensorFlow's registered "flops" statistics (those
    `tf.compat.v1.profiler.profile(..., ProfileOptionBuilder.float_operation())` adds up),
    except for the two convolution gradients, see below. Batch 1, so the total is per image.

    Counted: Conv2D and DepthwiseConv2dNative (2 x multiply-adds), both convolution gradients
    and transposed convolutions (Conv2DBackpropInput, Conv2DBackpropFilter: 2 x multiply-adds
    of the convolution they belong to, the same as its forward count), MatMul, BiasAdd and its
    gradient, pooling and its gradient, and the element-wise Add/Mul/Sub/RealDiv/Rsqrt/Square/
    Mean/Sum... (BatchNorm's arithmetic as Keras 3 writes it), Softmax, Log. Not counted (no
    statistics registered in TensorFlow): the depthwise convolutions' gradients (none here:
    the MobileNetV2 encoders are frozen), ReLU and its gradient, bilinear resizes,
    concatenations, and anything outside this function: the optimizer's update, metrics, and
    our loss's extras (ignore mask, class weights). Counted as TensorFlow executes them: a
    dilated convolution runs as SpaceToBatch + a VALID convolution over the padded blocks,
    which costs more than its useful multiply-adds at small feature maps (keras-io's rates 6,
    12, 18 on an 8x8 map), and the gradient of a first layer's input, which TensorFlow's graph
    holds and Grappler may prune, is included (a few percent at most).

    Why not the profiler's own total: TensorFlow's statistics for Conv2DBackpropInput and
    Conv2DBackpropFilter assume the input image size is the output size over the stride
    (SAME padding); for the VALID convolutions of a dilated convolution they count up to 9x
    too much (9.9 of the profiler's 26.7 GFLOP on keras-io's DeepLabV3+ at 128 px: 16.9 here,
    3x its 5.6 GFLOP forward pass). Here each is computed
    from its output gradient (forward output) shape and its kernel shape instead.

    The same function is counted for every variant, so a pair's two counts differ only by
    its two networks. Frozen layers get no gradient operations (the tape records only paths
    to watched variables).

    Args:
        model: The network (not the compiled training wrapper), a single logits output at the
            input resolution.
        crop: [height, width].
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops

    # Registers the statistics of the gradient, pooling and element-wise ops, as the profiler
    # does when it loads.
    from tensorflow.python.profiler.internal import flops_registry  # noqa: F401

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = loss_fn(labels, logits)
        return tape.gradient(loss, variables)

    graph = step.get_concrete_function(
        tf.TensorSpec([1, *crop, 3], tf.float32), tf.TensorSpec([1, *crop], tf.int32)
    ).graph
    total = 0
    for op in graph.get_operations():
        if op.type in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
            # inputs: (input or its sizes, filter or its sizes, out_backprop); NHWC.
            kernel = op.inputs[1].shape if op.type == "Conv2DBackpropInput" else op.outputs[0].shape
            out_backprop = op.inputs[2].shape
            total += 2 * int(np.prod(out_backprop.as_list()[:3])) * int(np.prod(kernel.as_list()))
            continue
        # An op without statistics, or whose shapes are not fully known, counts 0 (as in the
        # profiler).
        with contextlib.suppress(ValueError):
            total += tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value or 0
    return float(total) / 1e9


# ----- matmul --------------------------------------------------------------------------------
def bench_matmul(spec: dict) -> dict:
    """The machine's float32 matmul rate: an n x n by n x n `tf.linalg.matmul` (2 n^3 FLOP).

    The product is reduced to a scalar on the device before it is read (n^2 more additions,
    not counted) so that no copy of the result is timed; warmed up, then timed over at least
    `steps` calls and `min_seconds`.
    """
    import tensorflow as tf

    n = spec.get("n", 2048)
    a = tf.random.uniform((n, n), dtype=tf.float32, seed=0)
    b = tf.random.uniform((n, n), dtype=tf.float32, seed=1)
    product = tf.function(lambda: tf.reduce_sum(tf.linalg.matmul(a, b)))
    for _ in range(spec.get("warmup", 2)):
        product().numpy()
    calls, seconds = timed(lambda: product().numpy(), spec.get("steps", 5), spec["min_seconds"])
    return {
        "n": n,
        "calls": calls,
        "seconds_per_matmul": seconds / calls,
        "gflops_per_s": 2 * n**3 * calls / seconds / 1e9,
    }


# ----- inference -----------------------------------------------------------------------------
def bench_infer(spec: dict) -> dict:
    """img/s of each way to predict the same images, one image at a time.

    Every figure predicts class ids (argmax included) of `spec["images"]` uint8 images from a
    fixed-seed rng, at the crop size or, for the `_large` pair and slide, at `large` (1.5x the
    crop, rounded to a multiple of `eval.size_divisor`, so that slide runs several windows and
    a fully convolutional network takes the size as it is). Each is warmed up on the first
    image, then timed over whole passes of the images (at least `steps` passes and
    `min_seconds`). Ratios are left to run_all.py.

    Args:
        spec: overrides (the recipe), images, warmup, steps, min_seconds, tta_scales.

    Returns:
        crop, large, images, and img/s of: bare_predict (Keras' `model.predict`, batch 1,
        what a user would write), predictor (`predictor_from_config`, the `mode=infer` path,
        whole mode), predictor_tta (tta_scales x flip), bare_predict_large (`model.predict` of
        the network rebuilt at the large size; None and bare_predict_large_note if it cannot
        be), predictor_slide (eval.mode=slide, crop windows, on the large images) and
        savedmodel (the `mode=export` SavedModel's serving signature, loaded back).
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from seg_train.inference.serving import IDS_NAME, INPUT_NAME, SIGNATURE, write_saved_model
    from seg_train.tasks.export import _export_predictor
    from seg_train.tasks.instantiate import predictor_from_config

    out = scratch_dir("seg-bench-")
    cfg = compose(spec["overrides"] + [f"paths.output_dir={out}"])
    crop = list(cfg.data.crop_size)
    divisor = cfg.eval.size_divisor
    large = [max(1, round(1.5 * side / divisor)) * divisor for side in crop]
    model = instantiate(cfg.model, _convert_="all")
    rng = np.random.default_rng(0)
    count = spec["images"]
    images = [rng.integers(0, 256, (*crop, 3), dtype=np.uint8) for _ in range(count)]
    large_images = [rng.integers(0, 256, (*large, 3), dtype=np.uint8) for _ in range(count)]

    def images_per_s(predict, batch) -> float:
        """img/s of predict(batch): warm-up on batch[:1] (tracing), then whole passes."""
        for _ in range(spec["warmup"]):
            predict(batch[:1])
        calls, seconds = timed(lambda: predict(batch), spec["steps"], spec["min_seconds"])
        return len(batch) * calls / seconds

    def bare(net):
        return lambda batch: net.predict(np.stack(batch), batch_size=1, verbose=0).argmax(-1)

    def ours(predictor):
        return lambda batch: [predictor.labels(image) for image in batch]

    def predictor(**eval_options):
        # The eval.* overrides a user would pass on the command line, through the same code.
        return predictor_from_config(model, OmegaConf.merge(cfg, {"eval": eval_options}))

    result = {"crop": crop, "large": large, "images": count}
    result["bare_predict"] = images_per_s(bare(model), images)
    result["predictor"] = images_per_s(ours(predictor()), images)
    tta = {"scales": list(spec["tta_scales"]), "flip": True}
    result["predictor_tta"] = images_per_s(ours(predictor(tta=tta)), images)

    # Every model here is built for a fixed input size, which Keras' predict refuses at another
    # size; a user of a fully convolutional network rebuilds it at the size (same weights).
    try:
        at_large = keras.models.clone_model(model, input_tensors=keras.Input((*large, 3)))
        at_large.set_weights(model.get_weights())
        result["bare_predict_large"] = images_per_s(bare(at_large), large_images)
    except Exception as exc:  # noqa: BLE001 - which layer refuses the size is model-specific
        result["bare_predict_large"] = None
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        result["bare_predict_large_note"] = f"not fully convolutional: {first_line}"[:200]
    result["predictor_slide"] = images_per_s(ours(predictor(mode="slide")), large_images)

    # The SavedModel exactly as mode=export writes it (its Predictor, no probabilities: the
    # export.with_probabilities default), loaded back and called one image at a time.
    with tempfile.TemporaryDirectory(prefix="seg-bench-export-") as export_dir:
        path = Path(export_dir) / "saved_model"
        write_saved_model(_export_predictor(cfg, model), path, with_probabilities=False)
        serve = tf.saved_model.load(str(path)).signatures[SIGNATURE]

        def serving(batch):
            return [serve(**{INPUT_NAME: image[None]})[IDS_NAME].numpy() for image in batch]

        result["savedmodel"] = images_per_s(serving, images)
    return result


# ----- a whole seg-train run -----------------------------------------------------------------
def bench_job(spec: dict) -> dict:
    """`seg-train OVERRIDES` as a user runs it (e.g. a recipe with debug=fast), in a child
    process whose peak resident memory `main` reports (RUSAGE_CHILDREN: this worker only waits).

    Returns:
        exit_code, seconds, val_mean_iou (the run's final report: "mean_iou" of the
        metrics.json a training run writes into its run dir; None, with val_mean_iou_note
        saying why, where there is none), and the last lines of its output when it failed.
    """
    import subprocess

    run_dir = scratch_dir("seg-bench-job-") / "run"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "seg_train", *spec["overrides"], f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
    )
    result = {"exit_code": proc.returncode, "seconds": time.perf_counter() - started}
    if proc.returncode:
        result["output_tail"] = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    metrics = run_dir / "metrics.json"
    result["val_mean_iou"] = None
    if metrics.is_file():
        report = json.loads(metrics.read_text())
        result["val_mean_iou"] = report.get("mean_iou")
        if report.get("split") != "val" or result["val_mean_iou"] is None:
            result["val_mean_iou_note"] = (
                f"metrics.json of split {report.get('split')!r}, mean_iou "
                f"{report.get('mean_iou')!r}"
            )
            result["val_mean_iou"] = None
    else:
        result["val_mean_iou_note"] = f"no metrics.json in the run dir {run_dir}"
    return result


# ----- CRF -----------------------------------------------------------------------------------
def bench_crf(spec: dict) -> dict:
    import numpy as np

    from seg_train.inference.crf import CRFParams, CRFRunner

    rng = np.random.default_rng(0)
    height, width, classes = spec["height"], spec["width"], spec["classes"]
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    logits = rng.normal(0, 1, (height // 25 + 1, width // 25 + 1, classes)).astype(np.float32)
    logits = np.repeat(np.repeat(logits, 25, 0), 25, 1)[:height, :width]
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    runner = CRFRunner(CRFParams(), workers=spec["workers"])
    items = [(image, probabilities, i) for i in range(spec["images"])]
    list(runner.map(items[:1]))  # warm-up (imports, first allocation)
    start = time.perf_counter()
    # Pool start-up included: CRFRunner starts its pool per stream, as evaluation does.
    list(runner.map(items))
    elapsed = time.perf_counter() - start
    return {
        "ms_per_image": 1e3 * elapsed / spec["images"],
        "images": spec["images"],
        "workers": runner.workers,
    }


def main() -> None:
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    result = {
        "input": bench_input,
        "train": bench_train,
        "infer": bench_infer,
        "crf": bench_crf,
        "matmul": bench_matmul,
        "job": bench_job,
    }[kind](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
