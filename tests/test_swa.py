"""SWA in the harness: the cyclic schedule, the average against the by-hand mean of the snapshots, resume."""

from __future__ import annotations

import importlib

import pytest
import torch

from sharpness.harness import TrainConfig, load_checkpoint, train


def _config(**overrides):
    base = {"dataset": "digits", "model": "mlp", "model_options": {"depth": 3}, "optimizer": "erm", "lr": 0.1,
            "batch_size": 128, "epochs": 4, "seed": 0, "swa_start": 0.5, "swa_lr": 0.05, "swa_lr_min": 0.01,
            "swa_cycle": 3}
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    from sharpness.data import load_dataset

    return load_dataset("digits", seed=0)


def test_swa_average_is_the_mean_of_the_cycle_end_snapshots(digits, tmp_path, monkeypatch):
    snapshots, lrs = [], []
    original = torch.optim.swa_utils.AveragedModel.update_parameters

    def spy(self, model):
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return original(self, model)

    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", spy)
    train_module = importlib.import_module("sharpness.harness.train")

    step = train_module._Run.step

    def record_lr(self, x, y):
        loss = step(self, x, y)
        lrs.append((self._swa_step, self.optimizer.param_groups[0]["lr"]))
        return loss

    monkeypatch.setattr(train_module._Run, "step", record_lr)
    path = tmp_path / "swa.pt"
    result = train(_config(), data=digits, checkpoint=path, log=None)
    swa_lrs = [lr for active, lr in lrs if active]
    # Izmailov et al.'s cycle: (1 - t) a1 + t a2 with t = 1/3, 2/3, 1
    assert swa_lrs[:6] == pytest.approx([0.05 - 0.04 / 3, 0.05 - 0.08 / 3, 0.01] * 2)
    assert len(snapshots) == len(swa_lrs) // 3 == result.summary["swa_snapshots"] >= 2
    final = load_checkpoint(path)["model"]
    mean = [torch.stack(ps).mean(0) for ps in zip(*snapshots)]
    params = [v for k, v in final.items() if "running" not in k and "num_batches" not in k]
    assert len(params) == len(mean)
    for p, m in zip(params, mean):
        torch.testing.assert_close(p, m.cpu(), rtol=1e-6, atol=1e-7)  # the checkpoint is read onto the CPU
    assert result.epochs[-1]["test_acc"] == result.summary["test_acc"]  # the averaged model is evaluated


def test_resume_with_swa_is_bit_identical(digits, tmp_path):
    config = _config(swa_start=0.4)
    full = train(config, data=digits, log=None)
    path = tmp_path / "run.pt"
    train(config, data=digits, checkpoint=path, log=None, stop_after_epochs=2)
    assert load_checkpoint(path)["swa"]["steps"] > 0  # interrupted inside the SWA phase
    resumed = train(config, data=digits, checkpoint=path, log=None)
    strip = lambda records: [{k: v for k, v in r.items() if k != "wall_time"} for r in records]
    assert strip(resumed.epochs) == strip(full.epochs)
    assert resumed.summary["swa_snapshots"] == full.summary["swa_snapshots"]


@pytest.mark.parametrize("overrides,fragment", [
    ({"swa_start": 1.0}, "swa_start"),
    ({"swa_lr": None}, "swa_lr"),
    ({"swa_lr_min": 0.5}, "swa_lr_min"),
    ({"swa_cycle": 0}, "swa_cycle"),
    ({"swa_start": None}, "without swa_start"),
])
def test_swa_config_validation(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        _config(**overrides)


def test_runs_without_swa_keep_their_config_keys():
    plain = TrainConfig(dataset="digits", model="mlp")
    assert not any(key.startswith("swa") for key in plain.to_dict())
    assert TrainConfig.from_dict(_config().to_dict()) == _config()


def test_an_swa_phase_shorter_than_one_cycle_is_refused_or_warned(digits):
    """No cycle ending means no average: the run would report its last iterate as an SWA result."""
    # 12 steps per epoch x 4 epochs; from swa_start 0.9 on only 4 steps remain, less than the one-epoch cycle
    with pytest.raises(ValueError, match=r"Invalid SWA schedule: 4 of the planned 48 steps fall after swa_start = "
                                         r"0.9, fewer than one cycle of 12 steps"):
        train(_config(swa_start=0.9, swa_cycle=None), data=digits, log=None)
    # a gradient-evaluation budget plans 90 / 1.5 = 60 AE-SAM steps; always taking SAM it takes 45, and the 11
    # from swa_start on end no 12-step cycle: found only at the end, so a warning and swa_snapshots = 0
    config = _config(optimizer="aesam", epochs=None, budget_grad_evals=90, swa_start=0.75, swa_cycle=12,
                     optimizer_options={"lambda1": -1e9, "lambda2": -1e9})
    with pytest.warns(RuntimeWarning, match="SWA averaged no weights"):
        result = train(config, data=digits, log=None)
    assert (result.summary["steps"], result.summary["swa_snapshots"], result.summary["swa_steps"]) == (45, 0, 11)
