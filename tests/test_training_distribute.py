"""Strategies, precision and chief selection, exercised on CPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from omegaconf import OmegaConf

from seg_train.errors import UserError
from seg_train.training import distribute
from tests.helpers import TINY_TRAIN, cli_command, cli_env

MIRRORED_VS_SINGLE = textwrap.dedent(
    """
    import json, keras, numpy as np, tensorflow as tf
    from omegaconf import OmegaConf
    from seg_train.training import distribute
    from seg_train.models.unet import build_unet

    strategy = distribute.make_strategy(OmegaConf.create({"cpu_logical_devices": 2}))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 3, (8, 16, 16)).astype("uint8")
    labels[:, :2] = 255

    def losses(scope):
        with scope:
            keras.utils.set_random_seed(1)
            model = build_unet(3, (16, 16, 3), base_filters=2, depth=2)
            model.compile(optimizer=keras.optimizers.SGD(0.1),
                          loss=keras.losses.SparseCategoricalCrossentropy(
                              from_logits=True, ignore_class=255))
        data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
        history = model.fit(data, epochs=3, verbose=0, shuffle=False)
        return history.history["loss"]

    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "mirrored": losses(strategy.scope()),
        "single": losses(tf.distribute.get_strategy().scope()),
    }))
    """
)


def test_mirrored_on_two_cpu_devices_matches_single_device():
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_VS_SINGLE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    np.testing.assert_allclose(out["mirrored"], out["single"], rtol=1e-4)
    assert out["single"][-1] < out["single"][0]  # it did learn


def test_mixed_float16_trains_with_float32_logits():
    import keras

    from seg_train.models.unet import build_unet

    distribute.set_precision("mixed_float16")
    try:
        model = build_unet(3, (16, 16, 3), base_filters=2, depth=2, batch_norm=True)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255),
        )
        images = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
        labels = np.zeros((4, 16, 16), "uint8")
        history = model.fit(images, labels, epochs=2, batch_size=2, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.get_layer("encoder1_conv1").compute_dtype == "float16"
        assert str(model(images[:1]).dtype) in ("float32", "<dtype: 'float32'>")
    finally:
        distribute.set_precision("float32")


def test_bad_precision_and_batch_split_are_user_errors():
    with pytest.raises(UserError, match="trainer.precision"):
        distribute.set_precision("float8")
    strategy = types.SimpleNamespace(num_replicas_in_sync=3)
    with pytest.raises(UserError, match="data.batch_size=16.*3 replicas"):
        distribute.per_replica_batch(16, strategy)
    assert distribute.per_replica_batch(12, strategy) == 4


@pytest.mark.parametrize(
    ("cluster", "task", "chief"),
    [
        ({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:0"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
        ({"chief": ["c:0"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
    ],
)
def test_chief_is_worker_zero_or_the_chief_task(monkeypatch, cluster, task, chief):
    import tensorflow as tf

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    assert distribute.is_chief(types.SimpleNamespace(cluster_resolver=resolver)) is chief


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(UserError, match="hardware.strategy"):
        distribute.make_strategy(OmegaConf.create({"strategy": "magic"}))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_on_two_local_processes(cache_dir, tmp_path):
    """Two workers on loopback train together; only the chief writes checkpoints and reports."""
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        args = [
            *TINY_TRAIN,
            "hardware=multi_worker",
            "trainer.epochs=1",
            f"hydra.run.dir={tmp_path / f'worker{index}'}",
        ]
        workers.append(
            subprocess.Popen(
                cli_command(args),
                cwd=tmp_path,
                env=cli_env(cache_dir, {"TF_CONFIG": json.dumps(tf_config)}),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    log = (tmp_path / "worker0" / "seg-train.log").read_text()
    assert "CollectiveAllReduceStrategy: 2 replica(s), 4 images per replica, global batch 8" in log
    assert (tmp_path / "worker0" / "checkpoints" / "best.keras").is_file()
    assert (tmp_path / "worker0" / "metrics.json").is_file()
    assert not (tmp_path / "worker1" / "checkpoints").exists()
    assert not (tmp_path / "worker1" / "metrics.json").exists()
