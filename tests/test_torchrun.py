"""`torchrun` with 2 CPU processes (gloo) through the same `sharpness train` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sharpness.harness import Store, TrainConfig, run_key, train

# 22 full batches of 64: no uneven last batch, so DDP's mean of shard means is the global mean.
ARGS = ["train", "--dataset", "digits", "--model", "mlp", "--batch-size", "64", "--budget-steps", "22", "-q"]


def _torchrun(args, db):
    torchrun = shutil.which("torchrun") or ""
    command = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _attempt in range(2):
        done = subprocess.run([*command, "--standalone", "--nproc_per_node", "2", "-m", "sharpness", *args,
                               "--db", str(db)], capture_output=True, text=True, timeout=240, env=env, check=False)
        # A worker aborted by torch's C++ runtime (std::terminate) is retried once, from an empty store: seen once
        # in CI (session 15, rank 1 at the start of a compiled run), never in six reruns, three of them under
        # load. A Python error or a failed assertion is never retried.
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            return done
        for leftover in db.parent.glob(db.name + "*"):
            leftover.unlink()
    return done


@pytest.mark.parametrize("optimizer", ["erm", "aesam"])
def test_two_process_run_completes_and_is_stored_once(tmp_path, optimizer):
    db = tmp_path / "r.sqlite"
    done = _torchrun([*ARGS, "--optimizer", optimizer], db)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # only rank 0 reports
    with Store(db) as store:
        (run,) = store.runs()
    assert run.summary["world_size"] == 2 and run.summary["steps"] == 22
    # the same command on one process is another run: DDP perturbs per worker, so its own id in the store
    assert run.config["world_size"] == 2
    assert run.run_key != run_key({k: v for k, v in run.config.items() if k != "world_size"})
    assert run.summary["grad_evals"] == run.summary["steps"] + run.summary["sam_steps"]
    if optimizer == "erm":
        # DDP averages the two half-batch gradients: the same trajectory as one process on the global batch,
        # up to the order of floating-point additions.
        single = train(TrainConfig(dataset="digits", model="mlp", optimizer="erm", batch_size=64, epochs=None,
                                   budget_steps=22), log=None)
        assert run.summary["test_loss"] == pytest.approx(single.summary["test_loss"], abs=1e-5)
        assert run.summary["test_acc"] == pytest.approx(single.summary["test_acc"], abs=1 / 360)
        # the recorded training loss is the mean over both ranks' examples (one all-reduce per epoch), not
        # rank 0's half
        assert [r["train_loss"] for r in run.epochs] == pytest.approx(
            [r["train_loss"] for r in single.epochs], abs=1e-5)


def test_compiled_ddp_model_keeps_the_per_worker_perturbation(tmp_path):
    """``--compile`` under torchrun compiles the DDP module; the engine still finds DDP behind the compiled wrapper
    and runs the first pass under ``no_sync``. (Before, it did not see the DDP module, so the first pass was
    all-reduced: ``sync_perturbation`` results under the per-worker run's id, 1.5e-3 off in test loss here.)"""
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        db = tmp_path / f"{name}.sqlite"
        done = _torchrun([*ARGS, "--optimizer", "sam", *extra], db)
        assert done.returncode == 0, done.stderr[-3000:]
        with Store(db) as store:
            (run,) = store.runs()
        losses[name] = run.summary["test_loss"]
        assert run.summary.get("compile_backend") == (extra[-1] if extra else None)
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-6)
