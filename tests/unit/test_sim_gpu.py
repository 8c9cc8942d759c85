"""sim_gpu: the constant-latency test model, a SIMULATION of a GPU (tiny_cnn's network, each call held to
latency_ms)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from vfm.models import get_spec, load_model


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8) for _ in range(n)]


def test_it_says_it_is_a_simulation() -> None:
    spec = get_spec("sim_gpu")
    assert spec.random_weights and spec.weights is None
    assert spec.description.startswith("SIMULATION of a GPU")
    assert spec.to_json()["description"] == spec.description     # what `vfm models info sim_gpu` prints


def test_answers_are_tiny_cnns_and_every_call_lasts_at_least_the_latency() -> None:
    sim = load_model("sim_gpu", device="cpu", latency_ms=150)
    tiny = load_model("tiny_cnn", device="cpu")
    images = _images(8)
    assert [c.to_json() for c in sim.classify(images, top_k=3)] == [c.to_json() for c in tiny.classify(images, top_k=3)]
    np.testing.assert_array_equal(sim.embed(images), tiny.embed(images))
    assert sim.info()["description"].startswith("SIMULATION")
    for n in (1, 8):  # a sleep tops every network call up to the latency, whatever the batch size
        started = time.perf_counter()
        sim.embed(images[:n])
        assert time.perf_counter() - started >= 0.15


def test_default_latency_and_bad_options() -> None:
    assert load_model("sim_gpu", device="cpu").network.latency_s == pytest.approx(0.020)
    for bad in ("fast", -1, True, 10**6):
        with pytest.raises(ValueError, match="latency_ms must be a number of milliseconds"):
            load_model("sim_gpu", device="cpu", latency_ms=bad)
    with pytest.raises(ValueError, match="does not take option.*colour.*it takes: dtype, latency_ms"):
        load_model("sim_gpu", device="cpu", colour="blue")
