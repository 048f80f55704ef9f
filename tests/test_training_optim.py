"""Parameter-group optimizer, schedules and the optimizer configs (tiny models, CPU)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import h5py
import keras
import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console

from seg_train.errors import UserError
from seg_train.training import optim
from tests.helpers import CONFIG_DIR, REPO, compose_config

OPTIMIZER_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "optimizer").glob("*.yaml"))
LR = 0.01

# Expected learning-rate multiplier of each variable of `tiny_model` under sgd_poly's groups.
SGD_POLY_MULTS = {
    "conv1/kernel": 1,
    "conv1/bias": 1,
    "bn1/gamma": 1,
    "bn1/beta": 1,
    "aspp_conv_1/kernel": 10,
    "aspp_conv_1/bias": 20,
    "logits/kernel": 10,
    "logits/bias": 20,
}


@contextlib.contextmanager
def raises_user_error(match: str):
    """A `UserError`, also when Hydra's instantiate wraps it (the CLI unwraps it the same way)."""
    with pytest.raises((UserError, InstantiationException)) as info:
        yield
    error = info.value if isinstance(info.value, UserError) else info.value.__cause__
    assert isinstance(error, UserError), info.value
    assert re.search(match, str(error)), str(error)


def tiny_model(batch_norm: bool = True) -> keras.Model:
    """Backbone conv (+ BN), a head conv named like an ASPP branch, and a logits conv."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Conv2D(3, 1, name="aspp_conv_1")(x)
    x = keras.layers.Conv2D(2, 1, name="logits")(x)
    return keras.Model(inputs, x)


def sgd_poly(overrides: list[str] = (), **kwargs) -> keras.optimizers.Optimizer:
    cfg = compose_config(["optimizer=sgd_poly", f"optimizer.learning_rate={LR}", *overrides])
    return instantiate(cfg.optimizer, **{"total_steps": 1000, **kwargs})


def random_grads(variables, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Magnitudes >= 0.1 keep Adam's epsilon negligible in the hand computation.
    return [
        (np.sign(g) * (0.1 + np.abs(g))).astype("float32")
        for g in (rng.normal(size=v.shape) for v in variables)
    ]


def values(variables) -> dict[str, np.ndarray]:
    return {v.path: keras.ops.convert_to_numpy(v).astype("float64") for v in variables}


def test_sgd_step_uses_group_multipliers():
    model = tiny_model()
    opt = sgd_poly(["optimizer.inner.momentum=0.0", "optimizer.weight_decay=0"])
    assert isinstance(opt, optim.ParamGroupOptimizer)
    before = values(model.trainable_variables)
    grads = random_grads(model.trainable_variables)
    opt.apply(grads, model.trainable_variables)
    after = values(model.trainable_variables)
    assert set(after) == set(SGD_POLY_MULTS)
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        expected = -LR * SGD_POLY_MULTS[variable.path] * grad
        np.testing.assert_allclose(
            after[variable.path] - before[variable.path],
            expected,
            rtol=1e-4,
            atol=1e-8,
            err_msg=variable.path,
        )


def test_adam_step_sizes_follow_group_learning_rates():
    model = tiny_model()
    groups = OmegaConf.to_container(
        compose_config(["optimizer=sgd_poly"]).optimizer.param_groups, resolve=True
    )
    opt = optim.build_optimizer(
        keras.optimizers.Adam(beta_1=0.9, beta_2=0.999, epsilon=1e-7), LR, param_groups=groups
    )
    before = values(model.trainable_variables)
    grads = random_grads(model.trainable_variables)
    opt.apply(grads, model.trainable_variables)
    after = values(model.trainable_variables)
    b1, b2, eps = 0.9, 0.999, 1e-7
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        g = grad.astype("float64")
        lr = LR * SGD_POLY_MULTS[variable.path]
        # Keras Adam, first step: alpha = lr sqrt(1 - b2) / (1 - b1), m = (1 - b1) g,
        # v = (1 - b2) g^2, w -= alpha m / (sqrt(v) + eps)  ~=  lr * sign(g).
        alpha = lr * np.sqrt(1 - b2) / (1 - b1)
        expected = -alpha * (1 - b1) * g / (np.sqrt((1 - b2) * g**2) + eps)
        delta = after[variable.path] - before[variable.path]
        np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-9, err_msg=variable.path)
        # The step size is the group's learning rate, whatever the gradient's scale: scaling
        # gradients by 10 or 20 could not have produced it.
        np.testing.assert_allclose(np.abs(delta), lr, rtol=1e-3)


def test_weight_decay_touches_kernels_only():
    model = tiny_model()
    # A large coefficient keeps the change well above float32 rounding of the weights.
    opt = sgd_poly(["optimizer.inner.momentum=0.0", "optimizer.weight_decay=0.5"])
    before = values(model.trainable_variables)
    zeros = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    opt.apply(zeros, model.trainable_variables)
    after = values(model.trainable_variables)
    for path, mult in SGD_POLY_MULTS.items():
        if path.endswith("kernel"):
            expected = -LR * mult * 0.5 * before[path]
            np.testing.assert_allclose(
                after[path] - before[path], expected, rtol=1e-4, atol=1e-7, err_msg=path
            )
            assert np.abs(expected).max() > 0
        else:  # biases and BatchNorm gamma/beta
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_wd_mult_scales_the_decay():
    model = tiny_model()
    opt = optim.build_optimizer(
        keras.optimizers.SGD(),
        LR,
        weight_decay=0.5,
        param_groups=[{"pattern": "^logits", "lr_mult": 1, "wd_mult": 3}],
    )
    before = values(model.trainable_variables)
    opt.apply(
        [np.zeros(v.shape, "float32") for v in model.trainable_variables], model.trainable_variables
    )
    after = values(model.trainable_variables)
    for path, wd_mult in (("logits/kernel", 3), ("conv1/kernel", 1)):
        np.testing.assert_allclose(
            after[path] - before[path], -LR * 0.5 * wd_mult * before[path], rtol=1e-4, atol=1e-7
        )


def poly(step: int, total: int, power: float = 0.9, warmup: int = 0, base: float = LR) -> float:
    rate = base * (1 - min(step, total) / total) ** power
    return rate * min(1.0, (step + 1) / warmup) if warmup else rate


@pytest.mark.parametrize("warmup", [0, 10])
def test_poly_schedule_equals_formula(warmup):
    schedule = optim.PolyDecay(LR, total_steps=100, power=0.9, warmup_steps=warmup)
    for step in (0, 1, 5, 9, 10, 50, 99, 100, 150):
        np.testing.assert_allclose(
            float(schedule(step)),
            poly(step, 100, 0.9, warmup),
            rtol=1e-5,
            atol=1e-12,
            err_msg=f"step {step}",
        )
    if not warmup:  # Keras' PolynomialDecay is the same curve when it decays to exactly 0.
        keras_poly = keras.optimizers.schedules.PolynomialDecay(
            LR, 100, end_learning_rate=0.0, power=0.9
        )
        for step in (0, 33, 99):
            np.testing.assert_allclose(float(schedule(step)), float(keras_poly(step)), rtol=1e-5)


def test_group_learning_rates_follow_the_schedule():
    model = tiny_model()
    opt = sgd_poly(["optimizer.schedule.warmup_steps=2"], total_steps=10)
    zeros = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
    for step in range(4):
        expected = poly(step, 10, warmup=2)
        np.testing.assert_allclose(float(opt.learning_rate), expected, rtol=1e-5)
        for group, inner in zip(opt.groups, opt.group_optimizers(), strict=True):
            np.testing.assert_allclose(
                float(inner.learning_rate), expected * group.lr_mult, rtol=1e-5
            )
        opt.apply(zeros, model.trainable_variables)


def test_setting_the_base_rate_moves_every_group():
    opt = optim.build_optimizer(
        keras.optimizers.SGD(momentum=0.9), LR, param_groups=[{"pattern": "^logits", "lr_mult": 10}]
    )
    opt.learning_rate = 0.5  # what ReduceLROnPlateau and LearningRateScheduler do
    restored = optim.ParamGroupOptimizer.from_config(opt.get_config())
    for candidate in (opt, restored):
        np.testing.assert_allclose(float(candidate.learning_rate), 0.5)
        np.testing.assert_allclose(
            [float(o.learning_rate) for o in candidate.group_optimizers()], [5.0, 0.5]
        )


def test_schedules_count_updates_under_accumulation():
    opt = sgd_poly(
        ["optimizer.accumulation_steps=4"], total_steps=np.int64(100), steps_per_epoch=10
    )
    assert opt._learning_rate.total_steps == 25
    cfg = compose_config(["optimizer=step", "optimizer.accumulation_steps=2"])
    step = instantiate(cfg.optimizer, total_steps=100, steps_per_epoch=10)
    assert step._learning_rate.steps_per_epoch == 5


def test_step_schedule():
    schedule = optim.StepDecay(1e-3, steps_per_epoch=10, decay_epochs=7, decay_rate=0.1)
    keras_step = keras.optimizers.schedules.ExponentialDecay(1e-3, 70, 0.1, staircase=True)
    for step, expected in (
        (0, 1e-3),
        (69, 1e-3),
        (70, 1e-4),
        (139, 1e-4),
        (140, 1e-5),
        (210, 1e-6),
    ):
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)
        np.testing.assert_allclose(float(schedule(step)), float(keras_step(step)), rtol=1e-5)
    opt = instantiate(
        compose_config(["optimizer=step"]).optimizer, total_steps=100, steps_per_epoch=10
    )
    assert isinstance(opt, keras.optimizers.Adam)
    assert isinstance(opt._learning_rate, optim.StepDecay)
    assert opt._learning_rate.steps_per_epoch == 10
    with raises_user_error("steps_per_epoch"):
        instantiate(compose_config(["optimizer=step"]).optimizer, total_steps=100)


def fit_weights(accumulation: int, batch_size: int, inner: str) -> list[np.ndarray]:
    model = tiny_model(batch_norm=False)  # BatchNorm statistics depend on the batch size
    overrides = [f"optimizer.accumulation_steps={accumulation}"]
    if inner == "adam":
        overrides += [
            "optimizer.inner._target_=keras.optimizers.Adam",
            "~optimizer.inner.momentum",
            "~optimizer.inner.nesterov",
        ]
    # 8 images, 2 epochs: 4 optimizer updates either way.
    opt = sgd_poly(overrides, total_steps=2 * 8 // batch_size)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 2, size=(8, 4, 4)).astype("uint8")
    model.fit(x, y, batch_size=batch_size, epochs=2, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 4
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_gradient_accumulation_equals_big_batch(inner):
    big = fit_weights(accumulation=1, batch_size=4, inner=inner)
    accumulated = fit_weights(accumulation=2, batch_size=2, inner=inner)
    for a, b in zip(big, accumulated, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_save_load_restores_every_group_slot(tmp_path):
    model = tiny_model()
    opt = sgd_poly(["optimizer.accumulation_steps=2"], total_steps=20)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 2, size=(6, 4, 4)).astype("uint8")
    # 3 batches: one update done, one batch waiting in the accumulators.
    model.fit(x, y, batch_size=2, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=True)

    restored = loaded.optimizer
    assert isinstance(restored, optim.ParamGroupOptimizer)
    assert restored.get_config() == opt.get_config()
    assert len(restored.variables) == len(opt.variables)
    momentum_slots = 0
    for a, b in zip(opt.variables, restored.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        if "momentum" in a.path:
            momentum_slots += 1
            assert np.abs(keras.ops.convert_to_numpy(b)).max() > 0, a.path
    assert momentum_slots == len(model.trainable_variables)
    # Every slot is stored once (the inner optimizers are not saved a second time).
    with (
        zipfile.ZipFile(path) as archive,
        h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights,
    ):
        stored = []
        weights["optimizer"].visititems(
            lambda name, obj: stored.append(name) if isinstance(obj, h5py.Dataset) else None
        )
    assert len(stored) == len(opt.variables)
    # Training on continues identically (completes the pending accumulation).
    model.fit(x[:2], y[:2], batch_size=2, verbose=0)
    loaded.fit(x[:2], y[:2], batch_size=2, verbose=0)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-6, atol=1e-7
        )


def test_group_table_rows_and_print():
    model = tiny_model()
    opt = sgd_poly()
    rows = optim.param_group_rows(opt, model.trainable_variables)
    assert [
        (r["variables"], r["parameters"], r["lr_mult"], r["wd_mult"], r["decayed"]) for r in rows
    ] == [(2, 3 + 2, 20.0, 0.0, 0), (2, 9 + 6, 10.0, 1.0, 2), (4, 54 + 3 + 3 + 3, 1.0, 1.0, 1)]
    assert rows[-1]["pattern"] == optim.DEFAULT_GROUP_PATTERN
    buffer = io.StringIO()
    printed = optim.print_param_groups(
        opt, model.trainable_variables, console=Console(file=buffer, width=150)
    )
    assert printed == rows
    text = buffer.getvalue()
    for word in ("pattern", "lr_mult", "wd_mult", "(default)", "aspp|decoder_"):
        assert word in text
    plain = optim.param_group_rows(keras.optimizers.Adam(), model.trainable_variables)
    assert plain[0]["variables"] == len(model.trainable_variables)


@pytest.mark.parametrize("name", OPTIMIZER_CONFIGS)
def test_optimizer_config_composes_and_instantiates(name):
    cfg = compose_config([f"optimizer={name}", "optimizer.learning_rate=0.02"])
    assert cfg.optimizer.learning_rate == 0.02  # the stable key every optimizer config keeps
    opt = instantiate(cfg.optimizer, total_steps=100, steps_per_epoch=10)
    assert isinstance(opt, keras.optimizers.Optimizer)
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(opt.learning_rate)), 0.02, rtol=1e-6
    )
    model = tiny_model()
    opt.apply(random_grads(model.trainable_variables), model.trainable_variables)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 1


def test_config_errors_name_the_key(caplog):
    with pytest.raises(UserError, match=r"optimizer.param_groups\[0\].pattern"):
        optim.build_optimizer(keras.optimizers.SGD(), LR, param_groups=[{"pattern": "("}])
    with pytest.raises(UserError, match="lr_mult"):
        optim.build_optimizer(
            keras.optimizers.SGD(), LR, param_groups=[{"pattern": "x", "lr_mult": -1}]
        )
    with pytest.raises(UserError, match="optimizer.weight_decay"):
        optim.build_optimizer(keras.optimizers.SGD(weight_decay=1e-4), LR)
    with raises_user_error("total_steps"):
        instantiate(compose_config(["optimizer=sgd_poly"]).optimizer)
    with pytest.raises(UserError, match="accumulation_steps"):
        optim.build_optimizer(keras.optimizers.SGD(), LR, accumulation_steps=0)
    opt = optim.build_optimizer(
        keras.optimizers.SGD(), LR, param_groups=[{"pattern": "^no_such_layer"}]
    )
    opt.build(tiny_model().trainable_variables)
    assert "matches no trainable variable" in caplog.text


def test_mixed_float16_wraps_the_group_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((4, 4, 2))
        x = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
        x = keras.layers.Conv2D(2, 1, name="logits")(x)
        logits = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(x)
        model = keras.Model(inputs, logits)
        model.compile(
            optimizer=sgd_poly(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = np.random.default_rng(5).normal(size=(2, 4, 4, 2)).astype("float32")
    history = model.fit(x, np.ones((2, 4, 4), "uint8"), batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    rows = optim.param_group_rows(model.optimizer, model.trainable_variables)
    assert [r["variables"] for r in rows] == [1, 1, 2]


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, keras, tensorflow as tf
    from seg_train.training import optim
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    rng = np.random.default_rng(0)
    x = rng.random((16, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 2, (16, 4, 4)).astype("uint8")

    def run(strategy, accumulation, batch_size):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            inputs = keras.Input((4, 4, 2))
            h = keras.layers.Conv2D(3, 3, padding="same", name="conv1")(inputs)
            model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="logits")(h))
            opt = optim.build_optimizer(
                keras.optimizers.SGD(momentum=0.9), 0.1, weight_decay=0.05,
                param_groups=[{"pattern": "logits.*bias$", "lr_mult": 20, "wd_mult": 0},
                              {"pattern": "logits", "lr_mult": 10}],
                accumulation_steps=accumulation)
            model.compile(optimizer=opt,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size), epochs=2,
                  verbose=0)
        return [v.numpy() for v in model.trainable_variables]

    reference = run(tf.distribute.get_strategy(), 1, 8)
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 2, 4)
    print(max(float(np.abs(a - b).max()) for a, b in zip(reference, mirrored)))
""")


def test_accumulation_and_decay_under_mirrored_strategy():
    """2 replicas x 2 accumulated batches of 4 == one device, batches of 8 (fresh process)."""
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
