"""A hospital's round: DP-SGD, budget check, reseeding, FedProx; batches; evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrun_core.api import PrivacySpec, TrainingSpec
from fedrun_trainer.common.data import Table
from fedrun_trainer.common.model import build_model, get_weights, set_weights
from fedrun_trainer.common.privacy import BudgetExceeded, PrivacyLedger, new_ledger
from fedrun_trainer.hospital.train import (
    PoissonBatches,
    Rows,
    batch_loader,
    evaluate,
    start_training,
    train_round,
)

N_FEATURES = 4
TRAINING = TrainingSpec(learning_rate=0.5, batch_size=32)
DP = PrivacySpec(enabled=True, target_epsilon=2.0)


def table(n: int = 160, seed: int = 0) -> Table:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, N_FEATURES)).astype(np.float32)
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * x[:, 0]))).astype(np.float32)
    return Table(x, y, [f"f{i}" for i in range(N_FEATURES)])


def ledger(n: int = 160, rounds: int = 3) -> PrivacyLedger:
    return new_ledger(
        hospital="hospital-a",
        n_train=n,
        batch_size=TRAINING.batch_size,
        local_epochs=1,
        rounds=rounds,
        target_epsilon=DP.target_epsilon,
        delta=DP.delta,
    )


def test_dp_round_changes_weights_and_spends_epsilon() -> None:
    model = build_model(TRAINING, N_FEATURES)
    start = get_weights(model)
    result = train_round(
        model, table(), start, training=TRAINING, privacy=DP, ledger=ledger(), server_round=1
    )
    assert not np.allclose(result.weights[0], start[0])
    assert result.ledger is not None and result.ledger.rounds_trained == [1]
    assert result.ledger.steps == result.steps == 5
    assert 0 < result.epsilon == result.ledger.epsilon < DP.target_epsilon
    assert result.num_examples == 160 and np.isfinite(result.loss)
    assert np.array_equal(get_weights(model)[0], start[0])  # the template is not touched
    # A second round on the returned ledger spends more; a retried round spends nothing.
    again = train_round(
        model,
        table(),
        result.weights,
        training=TRAINING,
        privacy=DP,
        ledger=result.ledger,
        server_round=2,
    )
    assert again.ledger is not None and again.epsilon > result.epsilon
    retry = train_round(
        model,
        table(),
        result.weights,
        training=TRAINING,
        privacy=DP,
        ledger=again.ledger,
        server_round=2,
    )
    assert retry.skipped and retry.num_examples == 0 and retry.ledger == again.ledger


def test_reseeded_noise_differs_even_from_identical_random_state() -> None:
    # A process forked from a warm parent inherits its RNG state: simulate that.
    model = build_model(TRAINING, N_FEATURES)
    start = get_weights(model)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        results.append(
            train_round(
                model,
                table(),
                start,
                training=TRAINING,
                privacy=DP,
                ledger=ledger(),
                server_round=1,
            ).weights[0]
        )
    assert not np.allclose(results[0], results[1])


def test_budget_exceeded_before_training() -> None:
    model = build_model(TRAINING, N_FEATURES)
    start = get_weights(model)
    tight = ledger(rounds=1)
    first = train_round(
        model, table(), start, training=TRAINING, privacy=DP, ledger=tight, server_round=1
    )
    assert first.ledger is not None
    with pytest.raises(BudgetExceeded, match=r"target ε=2\.0"):
        train_round(
            model,
            table(),
            start,
            training=TRAINING,
            privacy=DP,
            ledger=first.ledger,
            server_round=2,
        )


def test_tiny_batches_survive_empty_poisson_draws() -> None:
    # Expected batch size 1 on 40 rows: some Poisson batches are empty.
    training = TrainingSpec(learning_rate=0.1, batch_size=1)
    small = new_ledger(
        hospital="h",
        n_train=40,
        batch_size=1,
        local_epochs=1,
        rounds=1,
        target_epsilon=50.0,
        delta=1e-5,
    )
    model = build_model(training, N_FEATURES)
    result = train_round(
        model,
        table(40),
        get_weights(model),
        training=training,
        privacy=PrivacySpec(target_epsilon=50.0),
        ledger=small,
        server_round=1,
    )
    assert result.steps == 40 and all(np.isfinite(w).all() for w in result.weights)


def test_without_privacy_plain_sgd_and_zero_epsilon() -> None:
    model = build_model(TRAINING, N_FEATURES)
    result = train_round(
        model,
        table(),
        get_weights(model),
        training=TRAINING,
        privacy=PrivacySpec(enabled=False),
        ledger=None,
        server_round=1,
        seed=3,
    )
    assert result.epsilon == 0.0 and result.noise_multiplier == 0.0
    assert result.weights[0][0, 0] > 0  # learnt the positive effect of f0


def test_fedprox_pulls_towards_global() -> None:
    model = build_model(TRAINING, N_FEATURES)
    start = get_weights(model)
    off = PrivacySpec(enabled=False)
    runs = {
        mu: train_round(
            model,
            table(),
            start,
            training=TRAINING,
            privacy=off,
            ledger=None,
            server_round=1,
            proximal_mu=mu,
            seed=11,
        ).weights
        for mu in (0.0, 1.0)
    }

    def distance(weights: list[np.ndarray]) -> float:
        return float(sum(np.sum((a - b) ** 2) for a, b in zip(weights, start, strict=True)))

    assert distance(runs[1.0]) < 0.8 * distance(runs[0.0])


def test_evaluate_metrics_in_range_and_one_class() -> None:
    model = build_model(TrainingSpec(model="mlp", hidden_sizes=[8, 4]), N_FEATURES, seed=1)
    weights = get_weights(model)
    result = evaluate(model, weights, table(200, seed=4))
    assert result.num_examples == 200
    assert result.loss > 0
    assert result.auroc is not None and 0 <= result.auroc <= 1
    assert result.auprc is not None and 0 <= result.auprc <= 1
    assert 0 <= result.accuracy <= 1
    one_class = table(50)
    one_class = Table(one_class.x, np.zeros(50, dtype=np.float32), one_class.feature_names)
    degenerate = evaluate(model, weights, one_class)
    assert degenerate.auroc is None and degenerate.auprc is None


def test_model_weights_round_trip_and_shape_check() -> None:
    mlp = build_model(TrainingSpec(model="mlp", hidden_sizes=[8, 4]), N_FEATURES, seed=1)
    same = build_model(TrainingSpec(model="mlp", hidden_sizes=[8, 4]), N_FEATURES, seed=1)
    weights = get_weights(mlp)
    assert [w.shape for w in weights] == [(8, 4), (8,), (4, 8), (4,), (1, 4), (1,)]
    assert all(np.array_equal(a, b) for a, b in zip(weights, get_weights(same), strict=True))
    logistic = build_model(TrainingSpec(model="logistic"), N_FEATURES)
    set_weights(logistic, [np.ones((1, N_FEATURES)), np.zeros(1)])
    assert get_weights(logistic)[0].tolist() == [[1.0] * N_FEATURES]
    with pytest.raises(ValueError, match="shape"):
        set_weights(logistic, [np.ones((1, 3)), np.zeros(1)])
    with pytest.raises(ValueError, match="unknown model"):
        build_model(TrainingSpec.model_construct(model="forest"), N_FEATURES)


def test_batches_cover_every_row_once_per_epoch() -> None:
    data = table(70)
    loader = batch_loader(data, 32)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [32, 32, 6]
    x = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    order = np.lexsort(x.T[::-1])
    expected = np.lexsort(data.x.T[::-1])
    np.testing.assert_array_equal(x[order], data.x[expected])
    np.testing.assert_array_equal(y[order], data.y[expected])
    empty_x, empty_y = Rows(data).__getitems__([])
    assert empty_x.shape == (0, N_FEATURES) and empty_y.shape == (0,)


@pytest.mark.parametrize("spec", [TRAINING, TrainingSpec(model="mlp", hidden_sizes=[5, 3])])
def test_dp_step_clips_each_row_s_gradient(spec: TrainingSpec) -> None:
    """Without noise, a DP step is SGD on the sum of per-row gradients each clipped to C,
    divided by the expected batch size: computed here one row at a time with autograd."""
    data = table(96, seed=3)
    privacy = PrivacySpec(enabled=True, max_grad_norm=0.05)
    model = build_model(spec, N_FEATURES, seed=1)
    start = [p.detach().clone() for p in model.parameters()]
    reference = build_model(spec, N_FEATURES, seed=1)
    run = start_training(model, data, spec, privacy, noise_multiplier=0.0)
    x, y = torch.from_numpy(data.x[:40]), torch.from_numpy(data.y[:40])
    assert run.step(x, y) is not None

    clipped_sum = [torch.zeros_like(p) for p in start]
    norms = []
    for i in range(len(y)):
        reference.zero_grad()
        logit = reference(x[i : i + 1]).reshape(-1)
        torch.nn.functional.binary_cross_entropy_with_logits(logit, y[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in reference.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, privacy.max_grad_norm / (float(norm) + 1e-6))
        for acc, g in zip(clipped_sum, grads, strict=True):
            acc += factor * g
    assert max(norms) > privacy.max_grad_norm  # clipping did something
    expected_batch = len(data) / len(batch_loader(data, spec.batch_size))
    for p, p0, acc in zip(model.parameters(), start, clipped_sum, strict=True):
        want = p0 - spec.learning_rate * acc / int(expected_batch)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_an_empty_poisson_batch_is_a_counted_noise_only_step() -> None:
    data = table(64)
    model = build_model(TRAINING, N_FEATURES)
    run = start_training(model, data, TRAINING, DP, noise_multiplier=1.0)
    assert run.engine is not None
    before = [p.detach().clone() for p in model.parameters()]
    empty = Rows(data).__getitems__([])
    assert run.step(*empty) is None
    params = list(model.parameters())
    moved = [not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)]
    assert all(moved)  # noise was added to every parameter
    assert run.engine.accountant.history == [(1.0, 0.5, 1)]


def test_poisson_batches_include_each_row_independently_with_probability_q() -> None:
    n, steps, draws = 200, 10, 6000
    sampler = PoissonBatches(n, steps, np.random.default_rng(7))
    q = 1 / steps
    counts = np.zeros(n)
    both = np.zeros(3)
    sizes = []
    batches = 0
    while batches < draws:
        for batch in sampler:
            assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
            chosen = np.zeros(n, dtype=bool)
            chosen[batch] = True
            counts += chosen
            both += [chosen[0] & chosen[1], chosen[5] & chosen[199], chosen[42] & chosen[43]]
            sizes.append(len(batch))
            batches += 1
    sigma = np.sqrt(q * (1 - q) / batches)
    assert np.abs(counts / batches - q).max() < 5 * sigma  # every row, probability q
    assert np.abs(both / batches - q * q).max() < 5 * np.sqrt(q * q / batches)  # independent
    assert abs(np.mean(sizes) - n * q) < 0.5
    assert abs(np.var(sizes) / (n * q * (1 - q)) - 1) < 0.15  # Binomial(n, q) sizes
    assert len(sampler) == steps


def test_poisson_batches_can_be_empty_and_the_accountant_gets_q() -> None:
    sampler = PoissonBatches(10, 10, np.random.default_rng(1))
    sizes = [len(b) for _ in range(200) for b in sampler]
    assert 0 in sizes  # P(empty) = 0.9^10 ≈ 0.35
    data = table(100)
    model = build_model(TRAINING, N_FEATURES)
    run = start_training(model, data, TRAINING, DP, noise_multiplier=1.3)
    batches = list(run.loader)
    assert len(batches) == len(run.loader) == 4  # ceil(100 / 32)
    for x, y in batches:
        run.step(x, y)
    assert run.engine is not None
    assert run.engine.accountant.history == [(1.3, 0.25, 4)]
