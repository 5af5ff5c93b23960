"""The harness's ``langevin_batches = "fresh"``: Entropy-SGD's Langevin passes 2..L (alone or inside SALR) each
take a fresh mini-batch from a stream fixed by the seed and the step, as the paper's Algorithm 1 samples one per
Langevin step; the training order, resuming and the run ids of other runs are unchanged."""

from __future__ import annotations

import importlib

import pytest
import torch

from sharpness.harness import TrainConfig, run_key, train

train_module = importlib.import_module("sharpness.harness.train")  # the package's `train` is the function


def _config(**overrides):
    base = {"dataset": "digits", "model": "mlp", "model_options": {"depth": 2}, "optimizer": "entropysgd",
            "optimizer_options": {"langevin_steps": 3}, "lr": 0.1, "batch_size": 128, "epochs": 2, "seed": 0,
            "langevin_batches": "fresh"}
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    from sharpness.data import load_dataset

    return load_dataset("digits", seed=0)


def _spy(monkeypatch):
    """Record ``(optimizer step, inputs)`` of every batch a training pass is built on."""
    seen = []
    original = train_module._Run.batch_loss

    def batch_loss(self, x, y):
        seen.append((self.optimizer.steps, x.detach().clone(), y.detach().clone()))
        return original(self, x, y)

    monkeypatch.setattr(train_module._Run, "batch_loss", batch_loss)
    return seen


def _rows(data):
    x, y = zip(*(data.train[i] for i in range(len(data.train))))
    return torch.stack(x), torch.stack(y)


def test_each_langevin_pass_gets_a_fresh_training_batch_and_the_training_order_is_kept(digits, monkeypatch):
    seen = _spy(monkeypatch)
    fresh = train(_config(), data=digits, log=None)
    fresh_seen = list(seen)
    seen.clear()
    same = train(_config(langevin_batches="same"), data=digits, log=None)
    steps = fresh.summary["steps"]
    assert steps == same.summary["steps"] == 2 * -(-len(digits.train) // 128)
    assert len(same_seen := list(seen)) == steps  # one batch per step: the Langevin passes reuse it
    assert len(fresh_seen) == 3 * steps  # the step's batch and L - 1 = 2 fresh ones
    train_x, train_y = _rows(digits)
    for step in range(steps):
        (s0, x0, _), *langevin = fresh_seen[3 * step:3 * step + 3]
        assert s0 == step and torch.equal(x0, same_seen[step][1])  # the training order is the "same" run's
        for s, x, y in langevin:
            assert s == step and x.shape[0] == 128 and not torch.equal(x, x0)
            # every fresh example is a training example with its label
            match = (x.flatten(1)[:, None, :] == train_x.flatten(1)[None, :, :]).all(-1)
            assert (match & (y[:, None] == train_y[None, :])).any(1).all()
    assert not torch.equal(fresh_seen[1][1], fresh_seen[4][1])  # step 0's first fresh batch is not step 1's
    assert fresh.epochs[-1]["train_loss"] != same.epochs[-1]["train_loss"]


def test_the_fresh_stream_follows_the_seed_and_resumes_exactly(digits, tmp_path, monkeypatch):
    config = _config(epochs=3)
    full = train(config, data=digits, log=None)
    assert train(config, data=digits, log=None).epochs[-1]["train_loss"] == full.epochs[-1]["train_loss"]
    other = train(_config(epochs=3, seed=1), data=digits, log=None)
    assert other.epochs[-1]["train_loss"] != full.epochs[-1]["train_loss"]
    path = tmp_path / "run.pt"
    train(config, data=digits, checkpoint=path, log=None, stop_after_epochs=1)
    resumed = train(config, data=digits, checkpoint=path, log=None)
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in resumed.epochs]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time"} for r in full.epochs]


def test_salr_over_entropy_sgd_walks_on_the_steps_batch_and_langevin_on_fresh_ones(digits, monkeypatch):
    seen = _spy(monkeypatch)
    config = _config(optimizer="salr", optimizer_options={"inner": "entropysgd", "every": 2,
                                                          "inner_options": {"langevin_steps": 3}}, epochs=None,
                     budget_steps=4)
    result = train(config, data=digits, log=None)
    assert result.summary["steps"] == 4
    # per step the closure is built on the step's batch once (the walks reuse it), and 2 fresh batches
    assert [s for s, _, _ in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("overrides,match", [
    ({"langevin_batches": "new"}, r"Invalid langevin_batches value: 'new' \(expected one of same, fresh\)"),
])
def test_bad_values_are_refused_by_the_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


@pytest.mark.parametrize("overrides", [
    {"optimizer": "sam", "optimizer_options": {}},
    {"optimizer_options": {"langevin_steps": 1}},  # no Langevin pass after the training pass
    {"optimizer": "salr", "optimizer_options": {"inner": "sam"}},
])
def test_fresh_batches_for_an_optimizer_without_langevin_passes_are_refused(digits, overrides):
    with pytest.raises(ValueError, match="Invalid langevin_batches value: 'fresh' for optimizer"):
        train(_config(**overrides), data=digits, log=None)


def test_the_default_is_left_out_of_the_run_id():
    same = _config(langevin_batches="same")
    assert "langevin_batches" not in same.to_dict()
    assert run_key(same.to_dict()) == run_key({k: v for k, v in _config().to_dict().items()
                                               if k != "langevin_batches"})
    assert _config().to_dict()["langevin_batches"] == "fresh"
    assert TrainConfig.from_dict(_config().to_dict()) == _config()


def test_fresh_batches_are_whole_batches_and_a_long_chain_draws_new_permutations(digits, monkeypatch):
    """With L - 1 = 4 fresh batches of 512 from a training set of two whole batches and a short one, every fresh
    batch is whole, and the two permutations a step draws are different ones."""
    seen = _spy(monkeypatch)
    train(_config(optimizer_options={"langevin_steps": 5}, batch_size=512, epochs=None, budget_steps=2),
          data=digits, log=None)
    assert len(digits.train) // 512 == 2 and len(digits.train) % 512 > 0
    fresh = [x for i, (_, x, _) in enumerate(seen) if i % 5]
    assert len(fresh) == 8 and all(x.shape[0] == 512 for x in fresh)
    assert not torch.equal(fresh[0], fresh[2]) and not torch.equal(fresh[1], fresh[3])
