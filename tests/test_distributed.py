"""DistributedDataParallel: two gloo processes on CPU.

One spawn (two ranks) runs every scenario; the tests below check its results:

* per-worker perturbation (the default with ``model=DDP(model)``): every registered optimizer, each rank with
  its own data, ends with bit-identical parameters and counters on both ranks and no hang;
  (also with ``gradient_as_bucket_view=True``);
* ``sync_perturbation=True``: two ranks with half a global batch each equal one process on the global batch;
* a GradScaler overflow on one rank only skips the step on every rank;
* a NaN loss on one rank only raises FloatingPointError on every rank, weights unchanged.

A hang fails the test (hard join timeout, collective timeout) instead of blocking the run.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import sharpness
from helpers import create_for_test, run_scenarios, run_spawned

WORLD = 2
STEPS_LOCAL = 20  # per-worker perturbation scenario
STEPS_SYNC = 10  # sync_perturbation scenario
GLOBAL_BATCH = 32
JOIN_TIMEOUT_S = 120
COLLECTIVE_TIMEOUT_S = 60

# AE-SAM / AE-LookSAM thresholds chosen so a 20-step run on noisy mini-batches takes both branches.
OPTIMIZER_KWARGS = {
    "aesam": {"lambda1": 0.0, "lambda2": 0.0},
    "aelooksam": {"lambda1": 0.0, "lambda2": 0.0},
    "looksam": {"k": 3},
    "sssam": {"p": 0.5, "seed": 3},
}

OPTIMIZER_NAMES = [info.name for info in sharpness.list_optimizers()]
#: settings under which these optimizers use the per-sample-loss closure (data selection, Fisher mask)
PER_SAMPLE_OPTIONS = {
    "esam": {"rho": 0.1, "beta": 0.6, "gamma": 0.5, "seed": 3},
    "ssamf": {"rho": 0.1, "sparsity": 0.5, "num_samples": 8, "update_freq": 2},
}

#: DCP round trips: LookSAM's direction reused right after the resume (k=2), AE-SAM's EMAs, Trace-SAM's stream
DCP_OPTIONS = {"looksam": {"k": 2}, "aesam": {}, "tracesam": {}}


def optimizer_kwargs(name: str, total_steps: int) -> dict:
    kwargs = dict(OPTIMIZER_KWARGS.get(name, {}))
    if "total_steps" in sharpness.get_optimizer_info(name).required:
        kwargs["total_steps"] = total_steps
    return kwargs


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def counters(opt: sharpness.SharpnessAwareOptimizer) -> dict[str, int]:
    return {"steps": opt.steps, "sam_steps": opt.sam_steps, "grad_evals": opt.grad_evals,
            "skipped_steps": opt.skipped_steps, "min_grad_evals_per_step": opt.min_grad_evals_per_step,
            "max_grad_evals_per_step": opt.max_grad_evals_per_step}


def sync_kwargs(name: str) -> dict:
    """``sync_perturbation=True`` where the class has a per-worker pass to synchronize; without one
    (``supports_sync_perturbation = False``) DDP already all-reduces every pass, so the default run is the
    global-batch one and is checked as such."""
    return {"sync_perturbation": True} if sharpness.get_optimizer_info(name).cls.supports_sync_perturbation else {}


def train(name: str, net: nn.Module, batches, total_steps: int, **engine_kwargs):
    """SGD + momentum under the named optimizer; the closure is the torch.optim convention."""
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = create_for_test(name, base, rho=0.1, **optimizer_kwargs(name, total_steps), **engine_kwargs)
    for x, y in batches:
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return opt


def local_batches(rank: int, steps: int):
    # Different data on every rank and at every step (noisy gradient norms for the adaptive policy).
    return [batch(1000 * (rank + 1) + t, GLOBAL_BATCH // WORLD) for t in range(steps)]


def global_batches(steps: int):
    return [batch(7 + t, GLOBAL_BATCH) for t in range(steps)]


def split(batches, rank: int):
    half = GLOBAL_BATCH // WORLD
    return [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in batches]


def train_scaled_with_one_rank_overflow(name: str, net: nn.Module, rank: int, batches, overflow_step: int):
    """GradScaler run in which only rank 1 overflows, in the first (unsynchronized) pass of one step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = create_for_test(name, base, rho=0.1, **optimizer_kwargs(name, len(batches)), model=net,
                           grad_scaler=scaler)
    for t, (x, y) in enumerate(batches):
        calls = [0]

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            scaled = scaler.scale(loss)
            if rank == 1 and t == overflow_step and calls[0] == 0:
                scaled = scaled * float("inf")
            calls[0] += 1
            scaled.backward()
            return loss

        opt.step(closure)
        scaler.update()
    return opt, scaler.get_scale()


def train_with_one_rank_nan(name: str, net: nn.Module, rank: int, batches, **options) -> dict:
    """Step 0 normal; in step 1 rank 1's second pass returns NaN. Records the error and the weights."""
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = create_for_test(name, base, rho=0.1, model=net, **options)
    out: dict = {"error": None}
    for t, (x, y) in enumerate(batches):
        calls = [0]

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            if rank == 1 and t == 1 and calls[0] == 1:
                loss = loss * float("nan")
            calls[0] += 1
            loss.backward()
            return loss

        out["before"] = flat_params(net)
        try:
            opt.step(closure)
        except FloatingPointError as error:
            out["error"] = str(error)
    out["after"], out["steps"] = flat_params(net), opt.steps
    return out


#: optimizers given a compiled DDP model in scenario (g), with options that make the second pass their last
COMPILED_NAN_OPTIONS = {"sam": {}, "entropysgd": {"langevin_steps": 2}}

#: a harness run on augmented images held as uint8 tensors (random crop + flip drawn per epoch): with a synchronized
#: perturbation two ranks must equal one process on the global batch, which needs every rank to draw the same
#: order, crops and flips and take its own half of each global batch
HARNESS_IMAGES = dict(dataset="cifar10", model="mlp", model_options={"depth": 2, "width": 16}, optimizer="sam",
                      optimizer_options={"sync_perturbation": True}, lr=0.05, batch_size=8, epochs=2, seed=0)


def image_splits():
    from sharpness.data import DatasetSplits, ImageTensors

    images = torch.randint(0, 256, (48, 3, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    labels = torch.arange(48) % 4
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    return DatasetSplits(name="images", train=ImageTensors(images[:40], labels[:40], mean=mean, std=std, padding=2,
                                                            flip=True),
                         test=ImageTensors(images[40:], labels[40:], mean=mean, std=std), num_classes=4,
                         input_shape=(3, 8, 8), classes=tuple("abcd"), task="classification", settings={})


#: Entropy-SGD with a fresh mini-batch per Langevin pass: every rank draws the same stream and takes its part
HARNESS_FRESH = {**HARNESS_IMAGES, "optimizer": "entropysgd", "optimizer_options": {"langevin_steps": 3},
                 "langevin_batches": "fresh", "lr": 0.5}


def harness_images_run(world_size: int, config: dict | None = None):
    from sharpness.harness import TrainConfig
    from sharpness.harness import train as harness_train

    run = harness_train(TrainConfig(**(config or HARNESS_IMAGES), world_size=world_size), data=image_splits(),
                        log=None, device="cpu")
    return {"params": flat_params(run.model), "test_loss": [r["test_loss"] for r in run.epochs],
            "steps": run.summary["steps"]}


class Heads(nn.Module):
    """A trunk and three heads: rank r's batches go through head r, head ``c`` is used by no rank (a DDP model
    built with ``find_unused_parameters=True``; the heads differ in size, so do the ranks' sets of gradients)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 3), nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))])
        self.c = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, head: int) -> torch.Tensor:
        return self.heads[head](torch.tanh(self.trunk(x))).double()


#: optimizers whose per-worker steps all-reduce gradients themselves (ERM branches, LookSAM's/GSAM's g), with
#: options that take both branches in the run
UNUSED_HEAD_OPTIONS = {"sssam": {"p": 0.0}, "sam": {}, "looksam": {"k": 2}, "gsam": {}, "aesam": {},
                       "aelooksam": {}, "esam": {"beta": 0.6, "seed": 3}}


def train_heads(name: str | None, rank: int) -> dict:
    """Per-worker DDP run in which each rank reaches another head; ``name=None``: plain DDP SGD (the reference)."""
    net = nn.parallel.DistributedDataParallel(Heads().double(), find_unused_parameters=True)
    base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = base if name is None else create_for_test(name, base, rho=0.1, model=net,
                                                    **{**optimizer_kwargs(name, 4), **UNUSED_HEAD_OPTIONS[name]})
    for x, y in local_batches(rank, 4):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x, rank), y)
            loss.backward()
            return loss

        opt.step(closure)
    return {"params": flat_params(net), "c": flat_params(net.module.c),
            "sam_steps": getattr(opt, "sam_steps", 0)}


def train_salr(net: nn.Module, batches, normalization: str, forward=None) -> dict:
    """SALR with an estimate every step and its per-sample closure; ``forward(x)``: the model call."""
    forward = forward or net
    opt = sharpness.SALR(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01), every=1,
                         n_descent=2, n_ascent=2, gamma=0.05, normalization=normalization, model=net)
    for x, y in batches:
        opt.step(sharpness.make_closure(
            opt, lambda reduction, x=x, y=y: nn.functional.cross_entropy(forward(x), y, reduction=reduction)))
    return {"params": flat_params(net), "sharpness": list(opt.sharpness_history)}


def ssamf_vmap(params) -> sharpness.SSAMF:
    return sharpness.SSAMF(torch.optim.SGD(params, lr=0.1), sparsity=0.5, fisher="vmap")


def fisher_mask(opt: sharpness.SSAMF, model: nn.Module) -> torch.Tensor:
    return torch.cat([opt.state[p]["perturbation_mask"].reshape(-1) for p in model.parameters()])


def dcp_resume(name: str, options: dict, rank: int, path: str) -> dict:
    """3 per-worker steps under DDP, a ``torch.distributed.checkpoint`` save (parameter names without DDP's
    ``module.``), 3 more steps; and a fresh DDP model and optimizer that load it and take the same 3 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build(model):
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return create_for_test(name, base, rho=0.1, model=model, **{**optimizer_kwargs(name, 6), **options})

    def steps(opt, model, batches):
        for x, y in batches:
            opt.step(lambda x=x, y=y: _backward(opt, model, x, y))

    batches = local_batches(rank, 6)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = build(model)
    steps(opt, model, batches[:3])
    weights, optim = get_state_dict(model, opt)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=path)
    steps(opt, model, batches[3:])
    again = nn.parallel.DistributedDataParallel(make_model())
    resumed = build(again)
    weights, optim = get_state_dict(again, resumed)
    target = {"model": weights, "optim": optim}
    dcp.load(target, checkpoint_id=path)
    set_state_dict(again, resumed, model_state_dict=target["model"], optim_state_dict=target["optim"])
    steps(resumed, again, batches[3:])
    return {"straight": flat_params(model), "resumed": flat_params(again), "counters": counters(opt),
            "resumed_counters": counters(resumed), "names": sorted(optim["state"])}


def _backward(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_scenarios(rank, init_file, out_dir, WORLD, COLLECTIVE_TIMEOUT_S,
                  lambda rank, result: _scenarios(rank, result, out_dir))


def _scenarios(rank: int, result: dict, out_dir: str):
    """The scenarios, run by each spawned rank (see :func:`helpers.run_scenarios`); each yields its name first."""
    # (a) per-worker perturbation, every registered optimizer, different data on each rank.
    for name in OPTIMIZER_NAMES:
        yield f"local/{name}"
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = train(name, model, local_batches(rank, STEPS_LOCAL), STEPS_LOCAL, model=model)
        result[("local", name)] = {"params": flat_params(model), **counters(opt)}
    # (a') the same with gradients as bucket views (p.grad aliases DDP's buffers).
    for name in OPTIMIZER_NAMES:
        yield f"bucket-view/{name}"
        model = nn.parallel.DistributedDataParallel(make_model(), gradient_as_bucket_view=True)
        opt = train(name, model, local_batches(rank, STEPS_SYNC), STEPS_SYNC, model=model)
        result[("bucket-view", name)] = {"params": flat_params(model), **counters(opt)}
    # (b) global perturbation: each rank takes its half of the global batch.
    for name in OPTIMIZER_NAMES:
        yield f"sync/{name}"
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = train(name, model, split(global_batches(STEPS_SYNC), rank), STEPS_SYNC, model=model,
                    **sync_kwargs(name))
        result[("sync", name)] = {"params": flat_params(model), **counters(opt)}
    # Same split data as (b) but per-worker perturbation: must differ from (b) (the test is sensitive).
    yield "split-local/sam"
    model = nn.parallel.DistributedDataParallel(make_model())
    train("sam", model, split(global_batches(STEPS_SYNC), rank), STEPS_SYNC, model=model)
    result[("split-local", "sam")] = {"params": flat_params(model)}
    # (c) GradScaler: an overflow on one rank only must skip the step on every rank.
    for name in ("sam", "aesam", "aelooksam"):
        yield f"amp/{name}"
        model = nn.parallel.DistributedDataParallel(make_model())
        opt, scale = train_scaled_with_one_rank_overflow(name, model, rank, local_batches(rank, 4), 1)
        result[("amp", name)] = {"params": flat_params(model), "scale": scale, **counters(opt)}
    # (d) the per-sample-loss closures (ESAM's data selection, SSAM-F's Fisher mask) under DDP.
    for name, options in PER_SAMPLE_OPTIONS.items():
        yield f"per-sample/{name}"
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = sharpness.create(name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model=model,
                               **options)
        assert opt.needs_per_sample_losses
        for x, y in local_batches(rank, STEPS_LOCAL):
            def compute_loss(reduction, x=x, y=y):
                return nn.functional.cross_entropy(model(x), y, reduction=reduction)

            opt.step(sharpness.make_closure(opt, compute_loss))
        result[("per-sample", name)] = {"params": flat_params(model), **counters(opt)}
    # (e) SSAM-F's vectorized exact Fisher: each rank its half of a global batch, through the DDP wrapper.
    yield "fisher-vmap/ssamf"
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = ssamf_vmap(model.parameters())
    (x, y), = split(global_batches(1), rank)
    opt.update_mask(model, nn.functional.cross_entropy, x, y)
    result[("fisher-vmap", "ssamf")] = {"mask": fisher_mask(opt, model)}
    # (f) a NaN loss in rank 1's perturbed pass only: every rank refuses the update (the verdict is reduced).
    for name in ("sam", "gnr"):
        yield f"nan/{name}"
        model = nn.parallel.DistributedDataParallel(make_model())
        result[("nan", name)] = train_with_one_rank_nan(name, model, rank, local_batches(rank, 2))
    # (g) the same through torch.compile(DDP(model)): the optimizers must find the DDP module behind the
    # wrapper (no_sync, the reduced verdict). The NaN is in the last pass, so only the verdict stops rank 0.
    for name, options in COMPILED_NAN_OPTIONS.items():
        yield f"nan-compiled/{name}"
        model = nn.parallel.DistributedDataParallel(make_model())
        result[("nan-compiled", name)] = train_with_one_rank_nan(
            name, torch.compile(model, backend="aot_eager"), rank, local_batches(rank, 2), **options)
    # (h) the harness on augmented images: the resident data path under DDP
    yield "harness-images"
    os.environ["WORLD_SIZE"] = str(WORLD)  # what torchrun sets; the harness reads the world from it
    result[("harness-images", "sam")] = harness_images_run(WORLD)
    result[("harness-images", "entropysgd-fresh")] = harness_images_run(WORLD, HARNESS_FRESH)
    # (i) find_unused_parameters=True, each rank reaching another head and none the third one.
    for name in [None, *UNUSED_HEAD_OPTIONS]:
        yield f"unused-heads/{name}"
        result[("unused-heads", name)] = train_heads(name, rank)
    # (j) SALR: each rank half of a global batch (both normalizations), and per-sample on the heads model.
    for normalization in ("batch", "per_sample"):
        yield f"salr-split/{normalization}"
        model = nn.parallel.DistributedDataParallel(make_model())
        result[("salr-split", normalization)] = train_salr(model, split(global_batches(4), rank), normalization)
    yield "salr-heads"
    model = nn.parallel.DistributedDataParallel(Heads().double(), find_unused_parameters=True)
    run = train_salr(model, local_batches(rank, 4), "per_sample", forward=lambda x: model(x, rank))
    result[("salr-heads", "per_sample")] = {**run, "c": flat_params(model.module.c)}
    # (k) torch.distributed.checkpoint round trips under DDP
    for name, options in DCP_OPTIONS.items():
        yield f"dcp/{name}"
        result[("dcp", name)] = dcp_resume(name, options, rank, os.path.join(out_dir, f"dcp-{name}"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("ddp"), JOIN_TIMEOUT_S)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_per_worker_perturbation_ranks_stay_identical(ddp_results, name):
    r0, r1 = (res[("local", name)] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]), (
        f"{name}: parameters diverged across ranks, max diff {(r0['params'] - r1['params']).abs().max():.3e}"
    )
    for key in ("steps", "sam_steps", "grad_evals", "skipped_steps"):
        assert r0[key] == r1[key], f"{name}: {key} differs across ranks ({r0[key]} vs {r1[key]})"
    assert r0["steps"] == STEPS_LOCAL
    assert r0["skipped_steps"] == 0
    if r0["max_grad_evals_per_step"] <= 2:  # one pass per step plus one per SAM step
        assert r0["grad_evals"] == r0["steps"] + r0["sam_steps"]
    else:  # multi-pass methods (Langevin chains, HVPs, walks): the instance's own bounds
        lo, hi = r0["min_grad_evals_per_step"], r0["max_grad_evals_per_step"]
        assert r0["steps"] * lo <= r0["grad_evals"] <= r0["steps"] * hi
    # The model actually trained.
    assert not torch.equal(r0["params"], flat_params(make_model()))


@pytest.mark.parametrize("name", sorted(PER_SAMPLE_OPTIONS))
def test_per_sample_loss_paths_ranks_stay_identical(ddp_results, name):
    r0, r1 = (res[("per-sample", name)] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]), (
        f"{name}: parameters diverged across ranks, max diff {(r0['params'] - r1['params']).abs().max():.3e}"
    )
    assert r0["steps"] == STEPS_LOCAL and r0["grad_evals"] == r1["grad_evals"] == 2 * STEPS_LOCAL
    assert not torch.equal(r0["params"], flat_params(make_model()))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_gradient_as_bucket_view_ranks_stay_identical(ddp_results, name):
    r0, r1 = (res[("bucket-view", name)] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"])
    for key in ("steps", "sam_steps", "grad_evals"):
        assert r0[key] == r1[key]
    assert r0["steps"] == STEPS_SYNC


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_per_worker_perturbation_exercises_both_branches(ddp_results, name):
    res = ddp_results[0][("local", name)]
    info = sharpness.get_optimizer_info(name)
    if info.max_grad_evals_per_step > 2:
        pytest.skip(f"{name}: max_grad_evals_per_step = {info.max_grad_evals_per_step} > 2, a multi-pass method "
                    "without a SAM/ERM branch pair (pass counts are checked in the ranks-identical test)")
    if info.min_grad_evals_per_step == 2:
        assert res["sam_steps"] == STEPS_LOCAL
    elif info.max_grad_evals_per_step == 1:
        assert res["sam_steps"] == 0
    else:
        assert 0 < res["sam_steps"] < STEPS_LOCAL, f"{name}: one branch only ({res['sam_steps']} SAM steps)"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_sync_perturbation_equals_single_process_global_batch(ddp_results, name):
    model = make_model()
    opt = train(name, model, global_batches(STEPS_SYNC), STEPS_SYNC, model=model)
    expected = flat_params(model)
    for rank, res in enumerate(ddp_results):
        got = res[("sync", name)]
        torch.testing.assert_close(got["params"], expected, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{name} rank {rank}: {m}")
        assert got["sam_steps"] == opt.sam_steps and got["grad_evals"] == opt.grad_evals
    assert torch.equal(ddp_results[0][("sync", name)]["params"], ddp_results[1][("sync", name)]["params"])


def test_per_worker_perturbation_differs_from_global(ddp_results):
    """Sensitivity: on the same split data, the default (local e(w)) is not the global-perturbation run."""
    local = ddp_results[0][("split-local", "sam")]["params"]
    synced = ddp_results[0][("sync", "sam")]["params"]
    assert (local - synced).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["sam", "aesam", "aelooksam"])
def test_overflow_on_one_rank_skips_the_step_on_every_rank(ddp_results, name):
    r0, r1 = (res[("amp", name)] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"])
    for res in (r0, r1):
        assert (res["steps"], res["skipped_steps"]) == (3, 1)
        assert res["scale"] == 2.0**9  # one backoff, no growth
    assert r0["sam_steps"] == r1["sam_steps"] and r0["grad_evals"] == r1["grad_evals"]


@pytest.mark.parametrize("name", ["sam", "gnr"])
def test_nan_on_one_rank_stops_every_rank_with_weights_unchanged(ddp_results, name):
    r0, r1 = (res[("nan", name)] for res in ddp_results)
    assert r0["error"] is not None, "rank 0 applied the update"
    if name == "sam":  # GNR's later passes on rank 0 start from the NaN-averaged gradient: its own NaN
        # (rank 0's losses are finite; its all-reduced gradient carries rank 1's NaN)
        assert "a pass of this step on another rank" in r0["error"], r0["error"]
    assert r1["error"] is not None and "pass 2 of this step" in r1["error"], r1["error"]
    for res in (r0, r1):
        assert torch.equal(res["after"], res["before"])  # step 1 not applied
        assert torch.isfinite(res["after"]).all() and res["steps"] == 1
    assert torch.equal(r0["after"], r1["after"])


@pytest.mark.parametrize("name", sorted(COMPILED_NAN_OPTIONS))
def test_nan_on_one_rank_stops_every_rank_through_a_compiled_ddp_model(ddp_results, name):
    """``torch.compile(ddp_model)`` as ``model=``: rank 0's own losses are finite and its all-reduced gradients
    NaN, so only the verdict reduced over the ranks (which needs the DDP module) keeps it from applying them."""
    r0, r1 = (res[("nan-compiled", name)] for res in ddp_results)
    assert r0["error"] is not None and "another rank" in r0["error"], "rank 0 applied the update"
    assert r1["error"] is not None and "pass 2 of this step" in r1["error"], r1["error"]
    for res in (r0, r1):
        assert torch.equal(res["after"], res["before"]) and torch.isfinite(res["after"]).all()
    assert torch.equal(r0["after"], r1["after"])


def test_fisher_vmap_mask_averaged_across_ranks_equals_the_global_batch_mask(ddp_results):
    """Each rank's Fisher sum over its half of the batch, averaged by update_mask, ranks the weights as the
    single-process sum over the whole batch does (the mask is a top-k: the factor 1/2 does not matter)."""
    model = make_model()
    opt = ssamf_vmap(model.parameters())
    (x, y), = global_batches(1)
    opt.update_mask(model, nn.functional.cross_entropy, x, y)
    expected = fisher_mask(opt, model)
    assert 0 < int(expected.sum()) < expected.numel()
    for res in ddp_results:
        assert torch.equal(res[("fisher-vmap", "ssamf")]["mask"], expected)


def test_harness_on_augmented_images_under_ddp_equals_one_process_on_the_global_batch(ddp_results, monkeypatch):
    """Images held as tensors, cropped and flipped per batch from the run's seeded stream: every rank draws the same
    epoch and takes its half of each global batch, so with a synchronized perturbation two ranks give the
    single-process run (to the rounding of the all-reduce)."""
    from sharpness.data import ImageTensors

    r0, r1 = (res[("harness-images", "sam")] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]) and r0["steps"] == 10
    single = harness_images_run(1)
    torch.testing.assert_close(r0["params"], single["params"], rtol=1e-5, atol=1e-6)
    assert r0["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    # the same order with other crops and flips moves the weights far beyond that tolerance
    draw = ImageTensors.draw
    monkeypatch.setattr(ImageTensors, "draw", lambda self, count, generator=None: draw(
        self, count, torch.Generator().manual_seed(9)))
    other_draws = harness_images_run(1)["params"]
    assert not torch.allclose(other_draws, single["params"], rtol=1e-3, atol=1e-4)


def test_fresh_langevin_batches_under_ddp_equal_one_process_on_the_global_batches(ddp_results):
    """``langevin_batches = "fresh"``: each rank takes its half of the same fresh global batches, and DDP
    all-reduces every Langevin pass, so two ranks give the single-process run (to the all-reduce's rounding)."""
    r0, r1 = (res[("harness-images", "entropysgd-fresh")] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]) and r0["steps"] == 10
    single = harness_images_run(1, HARNESS_FRESH)
    torch.testing.assert_close(r0["params"], single["params"], rtol=1e-5, atol=1e-6)
    same = harness_images_run(1, {**HARNESS_FRESH, "langevin_batches": "same"})
    assert not torch.allclose(same["params"], single["params"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(UNUSED_HEAD_OPTIONS))
def test_parameters_one_rank_does_not_reach_are_averaged_as_ddp_does(ddp_results, name):
    """Under ``no_sync`` a rank has no gradient for the head it did not use; the engine's own all-reduces (ERM
    steps, LookSAM's and GSAM's g) count it as zeros and leave a parameter no rank reached without a gradient,
    as DDP's reducer does. Before, each rank reduced its own list: gradients of different heads were added
    (or the ranks' buffers differed in size and the job died), and the ranks drifted apart."""
    r0, r1 = (res[("unused-heads", name)] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]), (
        f"{name}: ranks diverged, max diff {(r0['params'] - r1['params']).abs().max():.3e}")
    assert torch.equal(r0["c"], flat_params(Heads().double().c))  # no gradient: no weight decay, no momentum
    reference = ddp_results[0][("unused-heads", None)]["params"]
    if name == "sssam":  # p = 0: every step is an ERM step, plain DDP SGD bit for bit
        assert r0["sam_steps"] == 0 and torch.equal(r0["params"], reference)
    else:
        assert r0["sam_steps"] > 0 and not torch.equal(r0["params"], reference)


@pytest.mark.parametrize("normalization", ["batch", "per_sample"])
def test_salr_on_two_ranks_equals_one_process_on_the_global_batch(ddp_results, normalization):
    """SALR's training gradient, walk directions and endpoint losses are those of the global batch: with
    ``normalization="per_sample"`` they come from ``autograd.grad`` (no DDP reducer) and are averaged by SALR
    itself. Before, that mode stepped on each rank's own gradient and the ranks drifted apart (3.8e-2)."""
    model = make_model()
    expected = train_salr(model, global_batches(4), normalization)
    r0, r1 = (res[("salr-split", normalization)] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]) and r0["sharpness"] == r1["sharpness"]
    torch.testing.assert_close(r0["params"], expected["params"], rtol=0, atol=1e-10)
    assert r0["sharpness"] == pytest.approx(expected["sharpness"], rel=1e-8)
    assert not torch.equal(r0["params"], flat_params(make_model()))


def test_salr_per_sample_with_a_head_one_rank_does_not_reach(ddp_results):
    r0, r1 = (res[("salr-heads", "per_sample")] for res in ddp_results)
    assert torch.equal(r0["params"], r1["params"]) and r0["sharpness"] == r1["sharpness"]
    assert torch.equal(r0["c"], flat_params(Heads().double().c))


@pytest.mark.parametrize("name", list(DCP_OPTIONS))
def test_a_dcp_checkpoint_resumes_the_ddp_run_exactly(ddp_results, name):
    """``get_state_dict`` / ``dcp.save`` / ``dcp.load`` / ``set_state_dict`` on a DDP model: the resumed run equals
    the uninterrupted one bit for bit on every rank, with the state keyed by the module's parameter names."""
    for res in ddp_results:
        got = res[("dcp", name)]
        assert torch.equal(got["resumed"], got["straight"])
        assert got["resumed_counters"] == got["counters"]
        assert got["names"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
