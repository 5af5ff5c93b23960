"""The harness training loop: budgets, schedules, resume, checkpoints and config validation."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

import sharpness
from helpers import classification_data, make_closure, mlp, params_equal, registered_names
from sharpness.harness import TrainConfig, load_checkpoint, lr_factor, run_key, save_checkpoint, train


def _config(**overrides):
    base = dict(dataset="digits", model="mlp", model_options={"depth": 3}, optimizer="erm", lr=0.1, batch_size=64,
                epochs=2, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    from sharpness.data import load_dataset

    return load_dataset("digits", seed=0)


def test_lr_factor_schedules():
    assert lr_factor("constant", 0.7) == 1.0
    assert [lr_factor("step", p) for p in (0.0, 0.49, 0.5, 0.8)] == [1.0, 1.0, 0.1, 0.01]
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)


def test_multistep_schedule_is_torch_multisteplr_over_the_budget(digits):
    """``multistep`` with milestones as fractions of the budget is ``MultiStepLR`` with them in steps (the
    universal-SAM paper's decay by 0.1 every 50 of 200 epochs), and the harness applies it: the lr recorded at
    each epoch's end is the lr that MultiStepLR stepped per epoch gives."""
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[50, 100, 150], gamma=0.1)
    for step in range(200):
        assert lr_factor("multistep", step / 200, (0.25, 0.5, 0.75), 0.1) == pytest.approx(sgd.param_groups[0]["lr"],
                                                                                             rel=1e-12)
        sgd.step()
        scheduler.step()
    config = _config(epochs=4, schedule="multistep", lr_milestones=[0.25, 0.5, 0.75], lr_gamma=0.5)
    result = train(config, data=digits, log=None)
    sgd = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[1, 2, 3], gamma=0.5)
    expected = []
    for _ in range(4):
        expected.append(sgd.param_groups[0]["lr"])
        scheduler.step()
    assert [record["lr"] for record in result.epochs] == pytest.approx(expected, rel=1e-12)
    assert result.config.to_dict()["lr_milestones"] == (0.25, 0.5, 0.75)
    # other schedules leave both fields out of their run ids: runs stored before the schedule existed keep them
    assert "lr_milestones" not in _config().to_dict() and "lr_gamma" not in _config().to_dict()


def test_warmup_then_the_schedule_over_the_rest(digits):
    """``warmup = W/T`` is transformers' get_cosine_schedule_with_warmup (written out by hand here: s / W during
    the warm-up, then (1 + cos(pi (s - W) / (T - W))) / 2), and the harness's first steps follow it."""
    total, warm = 200, 20
    for step in range(total):
        by_hand = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert lr_factor("cosine", step / total, warmup=warm / total) == pytest.approx(by_hand, rel=1e-12, abs=1e-15)
    assert lr_factor("multistep", 0.54, (0.5,), 0.1, warmup=0.1) == 1.0  # milestones fall in the rest: 0.5 of 0.9
    assert lr_factor("multistep", 0.56, (0.5,), 0.1, warmup=0.1) == pytest.approx(0.1)
    result = train(_config(epochs=4, warmup=0.5, schedule="constant"), data=digits, log=None)
    per_epoch = result.summary["steps"] // 4  # the lr recorded at an epoch's end is the one its last step used
    expected = [0.1 * min(1.0, (e * per_epoch - 1) / (4 * per_epoch) / 0.5) for e in (1, 2, 3, 4)]
    assert [record["lr"] for record in result.epochs] == pytest.approx(expected, rel=1e-12)
    assert expected[0] < 0.05 and expected[2] == 0.1
    assert "warmup" not in _config().to_dict()  # runs without warm-up keep their run ids


@pytest.mark.parametrize("overrides, match", [
    ({"lr_milestones": [0.5]}, r"Invalid lr_milestones/lr_gamma for schedule 'cosine'"),
    ({"lr_gamma": 0.5, "schedule": "step"}, r"Invalid lr_milestones/lr_gamma for schedule 'step'"),
    ({"schedule": "multistep"}, r"Invalid lr_milestones value: \(\) \(expected one or more increasing"),
    ({"schedule": "multistep", "lr_milestones": [0.5, 0.5]}, r"Invalid lr_milestones value: \(0.5, 0.5\)"),
    ({"schedule": "multistep", "lr_milestones": [1.0]}, r"Invalid lr_milestones value: \(1.0,\)"),
    ({"schedule": "multistep", "lr_milestones": [0.5], "lr_gamma": 1.5}, r"Invalid lr_gamma value: 1.5"),
])
def test_multistep_schedule_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)
    with pytest.raises(TypeError, match=r"Invalid lr_milestones type: '0.5'"):
        _config(schedule="multistep", lr_milestones="0.5")


def test_equal_grad_eval_budget_gives_sam_half_the_steps(digits):
    budget = 60
    erm = train(_config(epochs=None, budget_grad_evals=budget), data=digits, log=None)
    sam = train(_config(optimizer="sam", epochs=None, budget_grad_evals=budget), data=digits, log=None)
    assert erm.summary["grad_evals"] == budget and erm.summary["steps"] == budget
    assert sam.summary["grad_evals"] == budget and sam.summary["steps"] == budget // 2
    aesam = train(_config(optimizer="aesam", epochs=None, budget_grad_evals=budget), data=digits, log=None)
    assert budget - 1 <= aesam.summary["grad_evals"] <= budget
    assert aesam.summary["steps"] + aesam.summary["sam_steps"] == aesam.summary["grad_evals"]


def test_step_budget_and_records(digits):
    result = train(_config(optimizer="sam", epochs=None, budget_steps=30), data=digits, log=None)
    assert result.summary["steps"] == 30 and result.summary["grad_evals"] == 60
    last = result.epochs[-1]
    expected = {"epoch", "train_loss", "test_loss", "test_acc", "lr", "sam_fraction", "grad_evals", "wall_time"}
    assert expected <= set(last)
    assert last["lr"] < 0.1  # cosine reached the end of the budget


def test_training_learns(digits):
    result = train(_config(optimizer="aesam", epochs=4), data=digits, log=None)
    assert result.summary["test_acc"] > 0.85
    assert 0.0 < result.summary["sam_fraction"] < 1.0


def _strip_times(records):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


@pytest.mark.parametrize("optimizer", ["sam", "aelooksam"])
def test_resume_equals_uninterrupted(digits, tmp_path, optimizer):
    config = _config(optimizer=optimizer, epochs=3)
    full = train(config, data=digits, log=None)
    path = tmp_path / "run.pt"
    partial = train(config, data=digits, checkpoint=path, log=None, stop_after_epochs=1)
    assert partial.summary == {"finished": False} and len(partial.epochs) == 1
    lines = []
    resumed = train(config, data=digits, checkpoint=path, log=lines.append)
    assert _strip_times(resumed.epochs) == _strip_times(full.epochs)
    assert lines[0] == f"checkpoint {path}: 1 epoch(s) done, resuming" and lines[1].startswith("epoch   2")
    lines.clear()
    train(config, data=digits, checkpoint=path, log=lines.append)  # a finished checkpoint: said, nothing trained
    assert lines == [f"checkpoint {path}: 3 epoch(s) done, finished; its summary follows"]
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["config"] == config.to_dict()


def test_checkpoint_from_another_config_is_refused(digits, tmp_path):
    path = tmp_path / "run.pt"
    train(_config(epochs=1), data=digits, checkpoint=path, log=None)
    with pytest.raises(ValueError, match="different config"):
        train(_config(epochs=1, seed=1), data=digits, checkpoint=path, log=None)


def test_bad_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "ok.pt", {"x": torch.ones(2)})
    assert torch.equal(load_checkpoint(tmp_path / "ok.pt")["x"], torch.ones(2))
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="Not a sharpness checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "unsafe.pt").write_bytes(pickle.dumps({"format": "sharpness-checkpoint-v1", "x": Payload()}))
    with pytest.raises(ValueError, match="not a safe torch checkpoint"):
        load_checkpoint(tmp_path / "unsafe.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("overrides, fragment", [
    ({"epochs": None}, "exactly one of"),
    ({"budget_steps": 10}, "exactly one of"),
    ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "lr"),
    ({"base": "lbfgs"}, "sgd, adam, adamw"),
    ({"schedule": "linear"}, "constant, step, cosine"),
    ({"label_noise": 1.5}, "label_noise"),
    ({"subset": 0.0}, "subset"),
    ({"seed": -1}, "seed"),
    ({"subset_strategy": "random"}, "stratified, first"),
    ({"lr": float("inf")}, r"Invalid lr value: inf \(expected 0.0 < lr < inf\)"),  # inf broke the run id's JSON
    ({"weight_decay": float("inf")}, r"Invalid weight_decay value: inf"),
    ({"swa_start": 0.5, "swa_lr": float("inf")}, r"Invalid swa_lr value: inf"),
    ({"batch_size": 2, "world_size": 4}, r"Invalid batch_size value: 2 \(expected batch_size >= world_size = 4"),
])
def test_config_validation(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        _config(**overrides)


def test_config_types_and_integers_taken_as_floats():
    with pytest.raises(TypeError, match=r"Invalid bf16 type: str \(expected bool\)"):
        _config(bf16="no")  # truthy: it would have turned bf16 on
    with pytest.raises(TypeError, match=r"Invalid optimizer_options type: NoneType"):
        _config(optimizer_options=None)
    # where a float is taken (a field, or an option by its constructor's annotation or default), an integer is
    # that float: the same config and run id as with 1.0; options taking integers keep them
    ints = _config(lr=1, optimizer="looksam", optimizer_options={"rho": 1, "k": 5}, model_options={"dropout": 0})
    floats = _config(lr=1.0, optimizer="looksam", optimizer_options={"rho": 1.0, "k": 5},
                     model_options={"dropout": 0.0})
    assert ints == floats and run_key(ints.to_dict()) == run_key(floats.to_dict())
    assert type(ints.lr) is float and type(ints.optimizer_options["rho"]) is float
    assert type(ints.optimizer_options["k"]) is int and type(ints.model_options["dropout"]) is float
    assert _config(optimizer="nope", optimizer_options={"rho": 1}).optimizer_options == {"rho": 1}  # checked later
    salr = _config(optimizer="salr", optimizer_options={"inner": "sam", "rho": 1, "n_descent": 2, "gamma": 1})
    assert salr.optimizer_options == {"inner": "sam", "rho": 1.0, "n_descent": 2, "gamma": 1.0}  # the inner's too
    assert type(salr.optimizer_options["rho"]) is float and type(salr.optimizer_options["n_descent"]) is int


def test_config_round_trip_and_unknown_keys():
    config = _config(optimizer_options={"rho": 0.1})
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown config keys: \\['rhoo'\\]"):
        TrainConfig.from_dict({**config.to_dict(), "rhoo": 1})


def test_bf16_label_smoothing_and_clipping_run(digits):
    config = _config(optimizer="sam", epochs=None, budget_steps=20, bf16=True, label_smoothing=0.1,
                     max_grad_norm=1.0)
    result = train(config, data=digits, log=None)
    assert result.summary["steps"] == 20
    assert result.epochs[-1]["train_loss"] < 2.3 and result.summary["test_acc"] > 0.3


@pytest.mark.parametrize("bf16", [False, True])
def test_training_passes_run_under_autocast_exactly_when_bf16_is_on(digits, monkeypatch, bf16):
    from torch import nn

    seen = []
    forward = nn.Linear.forward

    def recording_forward(self, x):
        if self.training and torch.is_grad_enabled():  # the training passes (evaluation runs without grad)
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, x)

    monkeypatch.setattr(nn.Linear, "forward", recording_forward)
    train(_config(optimizer="sam", epochs=None, budget_steps=3, bf16=bf16), data=digits, log=None)
    assert len(seen) == 3 * 2 * 3 and set(seen) == {bf16}  # 3 steps x 2 passes x 3 Linear layers


@pytest.mark.parametrize("bf16", [False, True])
def test_test_and_validation_evaluation_share_the_training_precision(monkeypatch, bf16):
    """The validation split is evaluated as the test split is: under bf16 autocast exactly when ``bf16`` is on
    (model selection on one precision and the reported number on another would not compare)."""
    from torch import nn

    from sharpness.data import load_dataset

    seen = []
    forward = nn.Linear.forward

    def recording_forward(self, x):
        if not self.training:  # the evaluation passes
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, x)

    data = load_dataset("digits", seed=0, validation=0.1)
    monkeypatch.setattr(nn.Linear, "forward", recording_forward)
    result = train(_config(epochs=1, bf16=bf16, validation=0.1), data=data, log=None)
    assert "val_acc" in result.epochs[-1]
    assert len(seen) >= 2 * 3 and set(seen) == {bf16}  # test and validation sets, 3 Linear layers each


def test_validation_accuracy_is_logged_and_summarized_as_the_final_models_accuracy():
    from sharpness.data import load_dataset

    data = load_dataset("digits", seed=0, validation=0.2)
    lines = []
    result = train(_config(epochs=2, validation=0.2), data=data, log=lines.append)
    model = result.model.eval()
    with torch.no_grad():  # by hand, over the held-out examples
        xs, ys = zip(*(data.validation[i] for i in range(len(data.validation))))
        correct = (model(torch.stack(xs)).argmax(1) == torch.as_tensor(ys)).double().mean().item()
    assert result.summary["val_acc"] == pytest.approx(correct, abs=1e-12)
    assert result.summary["val_loss"] == result.epochs[-1]["val_loss"]
    assert [f"val acc {r['val_acc']:.4f}" in line for r, line in zip(result.epochs, lines)] == [True, True]
    plain = train(_config(epochs=1), data=load_dataset("digits", seed=0), log=None)
    assert "val_acc" not in plain.summary and "val_loss" not in plain.summary


def test_measure_rho_and_samples_reach_the_per_epoch_measures(digits):
    from sharpness import measures

    config = _config(epochs=1, measures=("sam", "trace", "salr"), measure_examples=64, measure_rho=0.2,
                     measure_samples=7)
    assert config.to_dict()["measure_rho"] == 0.2 and config.to_dict()["measure_samples"] == 7
    result = train(config, data=digits, log=None)
    xs, ys = zip(*(digits.train[i] for i in range(64)))
    batch = (torch.stack(xs), torch.as_tensor(ys))
    f = torch.nn.functional.cross_entropy
    final = result.epochs[-1]
    assert final["sharpness.sam"] == pytest.approx(measures.sam_sharpness(result.model, f, batch, 0.2).value,
                                                   rel=1e-6)
    assert final["sharpness.trace"] == pytest.approx(
        measures.hessian_trace(result.model, f, batch, samples=7, seed=0).value, rel=1e-6)
    assert final["sharpness.salr"] == pytest.approx(
        measures.salr_sharpness_hat(result.model, f, batch, gamma=0.2 / 5).value, rel=1e-6)
    assert final["sharpness.sam"] != pytest.approx(measures.sam_sharpness(result.model, f, batch, 0.05).value)
    assert "measure_rho" not in _config(measures=("sam",)).to_dict()  # run ids kept at the defaults
    assert "measure_samples" not in _config(measures=("sam",)).to_dict()
    with pytest.raises(ValueError, match="Invalid measure_rho: set without measures"):
        _config(measure_rho=0.1)
    with pytest.raises(ValueError, match="Invalid measure_rho value: 0.0"):
        _config(measures=("sam",), measure_rho=0.0)
    with pytest.raises(ValueError, match="Invalid measure_samples value: 0"):
        _config(measures=("trace",), measure_samples=0)


def test_per_epoch_measures_are_recorded_and_do_not_change_training(digits):
    plain = train(_config(optimizer="sam", epochs=2), data=digits, log=None)
    config = _config(optimizer="sam", epochs=2, measures=("lambda_max", "sam"), measure_examples=128)
    measured = train(config, data=digits, log=None)
    for a, b in zip(plain.epochs, measured.epochs):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    assert measured.epochs[-1]["sharpness.lambda_max"] > 0 and measured.epochs[-1]["sharpness.sam"] >= 0
    # on the first measure_examples training examples, in stored order (no augmentation on digits)
    from sharpness.measures import hessian_eigenvalues
    xs, ys = zip(*(digits.train[i] for i in range(128)))
    top = hessian_eigenvalues(measured.model, torch.nn.functional.cross_entropy, (torch.stack(xs),
                              torch.as_tensor(ys)), seed=0)
    assert measured.epochs[-1]["sharpness.lambda_max"] == pytest.approx(top.value, rel=1e-5)
    # the summary carries the final measures (the report's "Final ..." columns and the CSV export read them)
    assert {k: v for k, v in measured.summary.items() if k.startswith("sharpness.")} == {
        k: measured.epochs[-1][k] for k in ("sharpness.lambda_max", "sharpness.sam")}
    assert not any(k.startswith("sharpness.") for k in plain.summary)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown measure name"):
        _config(measures=("lambda_min",))


def test_subset_strategy_first_takes_the_stored_order_and_keeps_old_run_ids(digits):
    from sharpness.data import load_dataset

    stratified, first = _config(subset=0.1), _config(subset=0.1, subset_strategy="first")
    assert "subset_strategy" not in stratified.to_dict()  # default: same keys (and run ids) as before
    assert first.to_dict()["subset_strategy"] == "first"
    assert TrainConfig.from_dict(first.to_dict()) == first
    def inputs(dataset):
        return torch.stack([dataset[i][0] for i in range(len(dataset))])

    data = load_dataset("digits", **first.dataset_options())
    full = inputs(digits.train)
    n = len(data.train)
    assert 0 < n < len(full) and torch.equal(inputs(data.train), full[:n])  # the first 10% in stored order
    strat = load_dataset("digits", **stratified.dataset_options())
    assert abs(len(strat.train) - n) <= 10 and not torch.equal(inputs(strat.train)[:n], full[:n])


def test_optimizer_random_stream_follows_the_run_seed(digits):
    """Optimizers with their own generator (SS-SAM, SmoothOut, ...) get the run's seed unless options set it."""
    from sharpness.harness.train import build_optimizer

    model = torch.nn.Linear(64, 10)
    opt = build_optimizer(_config(optimizer="smoothout", seed=7), model, total_steps=10)
    assert opt._rng.seed == 7
    opt = build_optimizer(_config(optimizer="smoothout", seed=7, optimizer_options={"seed": 3}), model, 10)
    assert opt._rng.seed == 3
    opt = build_optimizer(_config(optimizer="sam", seed=7), model, total_steps=10)  # no seed option: none given
    assert isinstance(opt, sharpness.SAM)


#: methods whose own random stream is used with their default options (SSAM-F draws only with fisher="sketch")
_DRAWING = {"entropysgd", "esam", "smoothout", "sssam", "tracesam", "frobsam", "detsam"}


@pytest.mark.parametrize("name, options", [*((n, {}) for n in sorted(_DRAWING | {"ssamf"})),
                                           ("salr", {"inner": "entropysgd"}), ("salr", {"inner": "sssam"})])
def test_every_optimizer_with_a_random_stream_is_seeded_by_the_run(name, options):
    """A run with seed 7 steps exactly as one with ``--opt seed=7`` (and, where the stream is drawn from,
    unlike seed 0). Trace/Frob/Det-SAM declare ``seed`` in UniversalSAM (through ``**kwargs``) and SALR passes
    it to its inner optimizer: the harness used to look only at the class's own signature, and left them at 0."""
    from sharpness.harness.train import build_optimizer, optimizer_option_names

    seeded = {n for n in registered_names() if "seed" in (optimizer_option_names(n) or [])}
    assert seeded == _DRAWING | {"ssamf"}
    x, y = classification_data(0)

    def run(seed, opts):
        model = mlp(0)
        config = _config(optimizer=name, seed=seed, optimizer_options={**options, **opts})
        opt = build_optimizer(config, model, total_steps=20)
        for _ in range(8):
            opt.step(make_closure(opt, model, x, y))
        return model

    by_run = run(7, {})
    assert params_equal(by_run, run(0, {"seed": 7}))
    if name in _DRAWING or options.get("inner") in _DRAWING:
        assert not params_equal(by_run, run(0, {}))


def test_data_options_reach_the_loader_and_keep_old_run_ids():
    from sharpness.data import load_dataset

    assert "data_options" not in _config().to_dict()
    config = _config(dataset="tinyshakespeare", data_options={"block_size": 16})
    assert config.to_dict()["data_options"] == {"block_size": 16}
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="data_options keys: \\['seed'\\]"):
        _config(data_options={"seed": 3})
    with pytest.raises(TypeError, match="block_size"):  # an option the data set does not have is refused
        load_dataset("digits", **_config(data_options={"block_size": 8}).dataset_options())


def test_result_carries_the_trained_model_and_optimizer(digits):
    result = train(_config(optimizer="salr", epochs=1), data=digits, log=None)
    assert result.optimizer.steps == result.summary["steps"] and result.optimizer.grad_evals == result.summary[
        "grad_evals"]
    assert len(result.optimizer.factor_history) == result.optimizer.steps  # e.g. SALR's factors, for plots
    from sharpness.harness.train import evaluate, make_loss

    _, acc = evaluate(result.model, digits.test, make_loss(result.config))
    assert acc == pytest.approx(result.summary["test_acc"])
    assert "Linear(" not in repr(result)  # the model object is kept out of the repr


def test_ssamf_vmap_refreshes_in_the_harness_like_the_per_sample_mode(digits):
    """The harness calls update_mask when the optimizer says mask_due; on a model without dropout or BatchNorm
    the vectorized exact Fisher of the first 32 examples of the batch gives the per_sample mode's training."""
    options = {"sparsity": 0.5, "num_samples": 32, "update_freq": 5}
    stream = train(_config(optimizer="ssamf", optimizer_options=options, epochs=1), data=digits, log=None)
    vmap = train(_config(optimizer="ssamf", optimizer_options={**options, "fisher": "vmap"}, epochs=1), data=digits,
                 log=None)
    steps = vmap.summary["steps"]
    assert vmap.optimizer.mask_updates == stream.optimizer.mask_updates == -(-steps // 5)
    assert vmap.optimizer.fisher_samples == stream.optimizer.fisher_samples == 32 * vmap.optimizer.mask_updates
    assert vmap.summary["grad_evals"] == 2 * steps
    assert vmap.summary["test_loss"] == pytest.approx(stream.summary["test_loss"], rel=1e-4)


def test_world_size_is_part_of_the_run_only_when_distributed(digits):
    config = _config(epochs=None, budget_steps=2)
    assert "world_size" not in config.to_dict()  # single-process runs keep their ids
    assert _config(world_size=2).to_dict()["world_size"] == 2
    with pytest.raises(ValueError, match=r"Invalid world_size value: 2 \(this run has 1 process; launch it with "
                                         r"torchrun --nproc_per_node 2\)"):
        train(_config(epochs=None, budget_steps=2, world_size=2), data=digits, log=None)
    with pytest.raises(ValueError, match="Invalid world_size value: 0"):
        _config(world_size=0)


def test_device_resolution_and_refusals(monkeypatch):
    from sharpness.harness import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"Invalid device value: 'cuda' \(CUDA is not available on this machine"):
        resolve_device("cuda")
    for bad in ("tpu0", "gpu", 3.5):
        with pytest.raises(ValueError, match="Invalid device value"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("auto") == torch.device("cuda", 1)  # under torchrun: this process's GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # more processes than GPUs: every rank on CPU (gloo), not a mix
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA device"):
        monkeypatch.setenv("LOCAL_RANK", "3")
        resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_the_run_records_its_device_but_keeps_its_id(digits):
    config = _config(epochs=None, budget_steps=3)
    auto = train(config, data=digits, log=None)
    cpu = train(config, data=digits, log=None, device="cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.summary["device"] == expected and cpu.summary["device"] == "cpu"
    assert "device" not in config.to_dict()
    if expected == "cpu":
        assert _strip_times(auto.epochs) == _strip_times(cpu.epochs)
    assert sharpness.harness.environment("cpu")["device"] == "cpu"
