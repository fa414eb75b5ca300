"""The warm executor: its Flower hook check, and why every forked task must reseed.

The fork tests do what ``ForkExecutor.launch`` does: ``os.fork()`` from one warm parent,
then (in the child) ``reseed()`` before any random draw. Without the reseed, children
inherit the parent's generator state and draw the same "random" numbers: the same DP
noise at every hospital and round.
"""

from __future__ import annotations

import os
import pickle
import random
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import flwr
import numpy as np
import pytest
import torch

from fedrun_core.api import PrivacySpec, TrainingSpec
from fedrun_trainer.common.data import Table
from fedrun_trainer.common.model import build_model, get_weights
from fedrun_trainer.common.privacy import new_ledger
from fedrun_trainer.hospital.train import train_round
from fedrun_trainer.warm_executor import PINNED_FLWR, check_hook, reseed

CHILD_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """As ``warm_up`` does before forking: no intra-op pool for the children to inherit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def in_forked_children(fn: Callable[[], Any], n: int = 2) -> list[Any]:
    """Run ``fn`` in ``n`` children forked from this process; their results, in order."""
    children: list[tuple[int, int]] = []
    for _ in range(n):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                os.close(read_fd)
                payload = pickle.dumps(fn())
                with os.fdopen(write_fd, "wb") as out:
                    out.write(payload)
                code = 0
            except BaseException:  # report, then leave without pytest's teardown
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
    results = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    for pid, read_fd in children:
        chunks = []
        try:
            while True:
                ready, _, _ = select.select(
                    [read_fd], [], [], max(0.0, deadline - time.monotonic())
                )
                if not ready:
                    os.kill(pid, signal.SIGKILL)
                    pytest.fail(f"forked child {pid} gave no answer in {CHILD_TIMEOUT_S}s")
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(read_fd)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "forked child failed (see its stderr)"
        results.append(pickle.loads(b"".join(chunks)))
    return results


def draws() -> dict[str, list[float]]:
    return {
        "torch": torch.randn(5).tolist(),
        "numpy": np.random.rand(5).tolist(),
        "random": [random.random() for _ in range(5)],
    }


# --------------------------------------------------------------------------- hook check


def test_hook_check_passes_with_the_installed_flwr() -> None:
    assert flwr.__version__ == PINNED_FLWR
    check_hook()


def test_hook_check_refuses_another_flwr_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(RuntimeError, match=r"flwr is 1\.42\.0.*built for 1\.41\.0"):
        check_hook()


# --------------------------------------------------------------------------- the noise


def test_forked_children_without_reseed_draw_identical_noise() -> None:
    """Why the reseed exists: a fork copies torch's and NumPy's generator state.

    (CPython reseeds its own ``random`` module in a forked child; torch and NumPy do not.)
    """
    torch.manual_seed(1234)
    np.random.seed(1234)
    first, second = in_forked_children(draws)
    assert first["torch"] == second["torch"]
    assert first["numpy"] == second["numpy"]
    assert len(set(first["torch"])) == 5  # real draws, not a constant


def test_forked_children_that_reseed_draw_different_noise() -> None:
    def reseeded() -> dict[str, Any]:
        seed = reseed()
        return {"seed": seed, **draws()}

    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    first, second = in_forked_children(reseeded)
    assert first["seed"] != second["seed"]
    for key in ("torch", "numpy", "random"):
        assert first[key] != second[key], key
        assert len(set(first[key]) & set(second[key])) == 0, key


@pytest.fixture(scope="module")
def dp_round() -> Callable[[int | None], list[list[float]]]:
    """One DP-SGD round (σ=1, 4 steps) on a tiny table, warmed up once in this process."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    table = Table(x=x, y=y, feature_names=["f0", "f1", "f2"])
    training = TrainingSpec(batch_size=16, learning_rate=0.5)
    privacy = PrivacySpec(target_epsilon=100.0, noise_multiplier=1.0)
    model = build_model(training, n_features=3, seed=42)
    start = get_weights(model)
    ledger = new_ledger(
        hospital="hospital-a",
        n_train=len(table),
        batch_size=training.batch_size,
        local_epochs=1,
        rounds=1,
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        noise_multiplier=privacy.noise_multiplier,
    )

    def run(seed: int | None) -> list[list[float]]:
        result = train_round(
            model,
            table,
            start,
            training=training,
            privacy=privacy,
            ledger=ledger,
            server_round=1,
            hospital="hospital-a",
            seed=seed,
        )
        assert result.noise_multiplier == 1.0 and result.steps == 4
        return [w.ravel().tolist() for w in result.weights]

    trained = run(0)  # the warm parent has run Opacus once, as warm_up() does
    assert trained != [w.ravel().tolist() for w in start]
    return run


def test_dp_training_after_fork_and_reseed_draws_different_noise(
    dp_round: Callable[[int | None], list[list[float]]],
) -> None:
    def child() -> dict[str, list[list[float]]]:
        reseed()
        # A pinned seed first: equal results across children mean any difference below
        # comes from the noise alone. Then fresh entropy, as in production.
        return {"pinned": dp_round(7), "fresh": dp_round(None)}

    first, second = in_forked_children(child)
    assert first["pinned"] == second["pinned"]
    assert first["fresh"] != second["fresh"]
    assert first["fresh"] != first["pinned"]
