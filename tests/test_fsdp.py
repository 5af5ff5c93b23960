"""FSDP2 (``fully_shard``): two gloo processes on CPU, parameters and gradients sharded as ``DTensor`` s.

One spawn (two ranks) runs every scenario; the tests below check its results:

* every optimizer whose step draws no random numbers, each rank with half of a global batch, equals one
  process on the global batch (the engine's list ops run on each rank's shards, its norms and inner products
  are summed over the shards); the output layer's 3 rows split unevenly (2 + 1) over the ranks;
* the random methods (Trace/Frob/Det-SAM, SmoothOut, Entropy-SGD, ESAM's masks) train, and their shared
  random stream stays in step on both ranks; each shard draws its own numbers (:func:`shard_stream`);
* a NaN loss on one rank stops every rank with the weights unchanged; an inf in one rank's shard of the
  gradients flags the GradScaler step on every rank;
* the settings that cannot run sharded (GNR's exact HVPs, SSAM-F's global mask, SALR's per-sample
  normalization) refuse at construction with a clear error;
* ``torch.distributed.checkpoint`` round trips: per-rank shards, resharding to one process, a gathered state
  dict broadcast from rank 0;
* ``MixedPrecisionPolicy`` (bf16 passes): SAM within bf16 rounding of the float64 run;
* HSDP (a second spawn, 4 ranks on a (replicate 2, shard 2) mesh): the run equals one process on the global
  batch, and a shard's replicas draw the same numbers.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import sharpness
from helpers import create_for_test, native, run_scenarios, run_spawned

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch without FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORLD = 2
STEPS = 6
GLOBAL_BATCH = 16
JOIN_TIMEOUT_S = 150
COLLECTIVE_TIMEOUT_S = 60

NAMES = [info.name for info in sharpness.list_optimizers()]
#: options under which a step draws no random numbers (the others are the defaults of the random methods)
DETERMINISTIC_OPTIONS = {
    "aesam": {"lambda1": 0.0, "lambda2": 0.0},
    "aelooksam": {"lambda1": 0.0, "lambda2": 0.0},
    "looksam": {"k": 3},
    "sssam": {"p": 0.5, "seed": 3},  # the policy's coin is one host draw, the same on every rank
    "entropysgd": {"noise": 0.0},
    "esam": {"beta": 1.0},
}
RANDOM = ["tracesam", "frobsam", "detsam", "smoothout", "entropysgd", "esam"]
DETERMINISTIC = [name for name in NAMES if name not in RANDOM or name in DETERMINISTIC_OPTIONS]
#: extra runs under another name: clipping (torch's clip_grad_norm_ on DTensors) and GNR's SAM oracle
VARIANTS = {"sam+clip": ("sam", {"max_grad_norm": 0.05}),
            "gnr+sam": ("gnr", {"oracle": "sam"})}
#: checkpoint round trips: LookSAM's stored direction (a DTensor in the state), Trace-SAM's random stream
RESUMED = {"looksam": {"k": 3}, "tracesam": {}}
#: DCP round trips (torch.distributed.checkpoint): LookSAM's direction is a DTensor in the state, Trace-SAM's
#: stream a plain tensor in the first param group
DCP = {"looksam": {"k": 2}, "tracesam": {}}  # (k=2: the first step after the save reuses the stored direction)
REFUSED = {"gnr": {"hvp": "exact"}, "ssamf": {"sparsity": 0.5}, "salr": {"normalization": "per_sample"}}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def shard(model: nn.Module, mesh=None, **options) -> nn.Module:
    """``fully_shard`` on each Linear and on the root (``mesh``: a 2-D (replicate, shard) mesh makes it HSDP;
    ``options``: more of ``fully_shard``'s, e.g. ``mp_policy``)."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fsdp.fully_shard(layer, mesh=mesh, **options)
    fsdp.fully_shard(model, mesh=mesh, **options)
    return model


def global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)) for _ in range(steps)]


def split(batches, rank: int, world: int = WORLD):
    part = GLOBAL_BATCH // world
    return [(x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]) for x, y in batches]


def full_params(model: nn.Module) -> torch.Tensor:
    """The whole parameter vector (a ``DTensor`` is gathered from every rank)."""
    parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in parts]).clone()


def build(name: str, model: nn.Module, **options):
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return create_for_test(name, base, rho=0.1, total_steps=STEPS, **options)


def train(opt, model: nn.Module, batches, nan_in_pass: int | None = None):
    """``nan_in_pass``: the loss of that pass (1, 2, ...) of every step is NaN."""
    for x, y in batches:
        passes = []

        def closure(x=x, y=y, passes=passes):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            passes.append(1)
            if len(passes) == nan_in_pass:
                loss = loss * float("nan")
            loss.backward()
            return loss

        opt.step(closure)
    return opt


def counters(opt) -> dict:
    return {key: getattr(opt, key) for key in ("steps", "sam_steps", "grad_evals")}


def run(name: str, options: dict, rank: int | None, mesh=None, world: int = WORLD) -> dict:
    """``rank`` None: one process on the global batch; else this rank's part of it, FSDP2-sharded (over
    ``mesh``; None: all ``world`` ranks)."""
    model = make_model()
    batches = global_batches(STEPS)
    if rank is not None:
        model, batches = shard(model, mesh), split(batches, rank, world)
    opt = train(build(name, model, **options), model, batches)
    return {"params": full_params(model), "streams": generator_states(opt.state_dict()), **counters(opt)}


def generator_states(tree) -> list[torch.Tensor]:
    """Every ``torch.Generator`` state (a uint8 tensor) in a nested state dict."""
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.dtype == torch.uint8 else []
    if isinstance(tree, dict):
        return [s for value in tree.values() for s in generator_states(value)]
    if isinstance(tree, (list, tuple)):
        return [s for value in tree for s in generator_states(value)]
    return []


def draws(rank: int) -> dict:
    """:func:`shard_stream` on a sharded and on a replicated DTensor, from equal shared generators."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sharpness.optim._generator import shard_stream

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for kind, placement in (("shard", Shard(0)), ("replicate", Replicate())):
        like = distribute_tensor(torch.zeros(8, 3), mesh, [placement])
        shared = torch.Generator().manual_seed(5)
        values = [torch.randn(4, 3, generator=shard_stream(shared, like)) for _ in range(2)]  # two steps
        out[kind] = {"values": torch.stack(values), "shared": shared.get_state()}
    return out


def reductions(rank: int) -> dict:
    """``squared_norm`` and ``dot`` (with its scratch list) over a mix of layouts: a row-sharded DTensor (5 rows:
    3 + 2), a replicated one and a plain tensor, against the same sums of the whole tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sharpness._foreach import dot, squared_norm

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(11)
    whole = [[torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64),
              torch.randn(2, generator=g, dtype=torch.float64)] for _ in range(2)]
    laid = [[distribute_tensor(a.clone(), mesh, [Shard(0)]), distribute_tensor(b.clone(), mesh, [Replicate()]),
             c.clone()] for a, b, c in whole]
    scratch = [torch.empty_like(t) for t in laid[0]]
    return {"squared_norm": float(squared_norm(laid[0])), "dot": float(dot(laid[0], laid[1], scratch=scratch)),
            "expected_squared_norm": float(sum(t.square().sum() for t in whole[0])),
            "expected_dot": float(sum((x * y).sum() for x, y in zip(*whole, strict=True)))}


def unscale_flag(rank: int) -> float:
    """``amp.unscale_`` on DTensor gradients with an inf in rank 1's shard only: the flag every rank sees."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sharpness.amp import unscale_

    mesh = init_device_mesh("cpu", (WORLD,))
    grad = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    if rank == 1:
        grad.to_local()[0, 0] = float("inf")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    found = torch.zeros(1)
    unscale_(scaler, [grad], found)
    return float(found)


def dcp_round_trip(name: str, options: dict, rank: int, path: str) -> dict:
    """3 sharded steps, a DCP checkpoint (``get_optimizer_state_dict`` + ``dcp.save``, each rank writing its
    shards), 3 more steps; and a fresh sharded model and optimizer that load it and take the same 3 steps. Also
    rank 0's full (gathered, CPU) optimizer state dict, as ``StateDictOptions(full_state_dict=True)`` gives it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    batches = split(global_batches(STEPS), rank)
    model = shard(make_model())
    opt = train(build(name, model, **options), model, batches[:3])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    gathered = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = {"model": get_model_state_dict(model, options=gathered),
            "optim": get_optimizer_state_dict(model, opt, options=gathered)}
    train(opt, model, batches[3:])
    again = shard(make_model())
    resumed = build(name, again, **options)
    target = {"model": get_model_state_dict(again), "optim": get_optimizer_state_dict(again, resumed)}
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(again, target["model"])
    set_optimizer_state_dict(again, resumed, target["optim"])
    loaded = counters(resumed)
    train(resumed, again, batches[3:])
    # the gathered state dict held by rank 0 only, broadcast and sharded into a fresh sharded run
    third = shard(make_model())
    from_full = build(name, third, **options)
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    given = copy.deepcopy(full) if rank == 0 else {"model": {}, "optim": {}}  # (loading edits the dicts given)
    set_model_state_dict(third, given["model"], options=broadcast)
    set_optimizer_state_dict(third, from_full, given["optim"], options=broadcast)
    train(from_full, third, batches[3:])
    return {"straight": full_params(model), "resumed": full_params(again), "loaded_counters": loaded,
            "counters": counters(opt), "resumed_counters": counters(resumed), "path": path,
            "from_full": full_params(third), "from_full_counters": counters(from_full),
            "full": full if rank == 0 else None}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    run_scenarios(rank, init_file, out_dir, WORLD, COLLECTIVE_TIMEOUT_S,
                  lambda rank, result: _scenarios(rank, result, out_dir))


def _scenarios(rank: int, result: dict, out_dir: str):
    """The scenarios, run by each spawned rank (see :func:`helpers.run_scenarios`); each yields its name first."""
    for name in NAMES:
        yield name
        result[name] = run(name, DETERMINISTIC_OPTIONS.get(name, {}) if name in DETERMINISTIC else {}, rank)
    for name in RANDOM:  # the random defaults too, and the shared stream's state at the end
        yield f"random/{name}"
        model = shard(make_model())
        opt = train(build(name, model), model, split(global_batches(STEPS), rank))
        result[f"random/{name}"] = {"params": full_params(model), "streams": generator_states(opt.state_dict()),
                                    **counters(opt)}
    for label, (name, options) in VARIANTS.items():
        yield label
        result[label] = run(name, options, rank)
    for name, options in RESUMED.items():  # per-rank checkpoints: state_dict() holds DTensors
        yield f"resume/{name}"
        batches = split(global_batches(STEPS), rank)
        model = shard(make_model())
        opt = train(build(name, model, **options), model, batches[:3])
        saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        train(opt, model, batches[3:])
        again = shard(make_model())
        resumed = build(name, again, **options)
        again.load_state_dict(saved[0])
        resumed.load_state_dict(saved[1])
        train(resumed, again, batches[3:])
        result[f"resume/{name}"] = {"straight": full_params(model), "resumed": full_params(again),
                                    "state": saved[1]}
    yield "mixed/sam"  # bf16 compute (MixedPrecisionPolicy): the optimizer sees the float64 shards
    model = shard(make_model(), mp_policy=fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                    reduce_dtype=torch.float32))
    opt = train(build("sam", model), model, split(global_batches(STEPS), rank))
    result["mixed/sam"] = {"params": full_params(model), **counters(opt)}
    for name, options in DCP.items():
        yield f"dcp/{name}"
        result[f"dcp/{name}"] = dcp_round_trip(name, options, rank, os.path.join(out_dir, f"dcp-{name}"))
    yield "nan"
    model = shard(make_model())
    opt = build("sam", model)
    batches = split(global_batches(2), rank)
    train(opt, model, batches[:1])
    before = full_params(model)
    try:
        # rank 1's perturbed pass only: its NaN gradients reach rank 0's shards through the reduce-scatter,
        # while rank 0's own losses stay finite, so only the reduced verdict stops rank 0
        train(opt, model, batches[1:], nan_in_pass=2 if rank == 1 else None)
        result["nan"] = {"raised": None}
    except FloatingPointError as error:
        result["nan"] = {"raised": str(error)}
    result["nan"].update(before=before, after=full_params(model), steps=opt.steps)
    yield "draws"
    result["draws"] = draws(rank)
    yield "reductions"
    result["reductions"] = reductions(rank)
    yield "unscale"
    result["unscale"] = unscale_flag(rank)
    yield "adaptive-smoothout"  # per-filter norms: whole rows under Shard(0), refused under Shard(1)
    from torch.distributed.tensor import Shard

    model = shard(make_model())
    opt = train(build("smoothout", model, adaptive=True), model, split(global_batches(2), rank))
    # (the output layer's 3 x 16 weight by its 16 columns; FSDP2 wants even shards on a dimension other than 0)
    by_columns = shard(make_model(), shard_placement_fn=lambda p: Shard(1) if p.shape == (3, 16) else None)
    try:
        build("smoothout", by_columns, adaptive=True)
        refused = None
    except NotImplementedError as error:
        refused = str(error)
    result["adaptive-smoothout"] = {"steps": opt.steps, "refused": refused,
                                    "plain_builds": build("smoothout", by_columns).steps == 0}
    for name, options in REFUSED.items():
        yield f"refused/{name}"
        try:
            build(name, shard(make_model()), **options)
            result[f"refused/{name}"] = None
        except NotImplementedError as error:
            result[f"refused/{name}"] = str(error)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return run_spawned(_worker, WORLD, tmp_path_factory.mktemp("fsdp"), JOIN_TIMEOUT_S)


@pytest.mark.parametrize("name", [*DETERMINISTIC, *VARIANTS])
def test_sharded_run_equals_one_process_on_the_global_batch(fsdp_results, name):
    """FSDP2 reduce-scatters the mean gradient, so every pass sees the global batch's gradient (there is no
    per-worker perturbation to keep, unlike DDP's ``no_sync``): the run must be the one-process run."""
    optimizer, options = VARIANTS.get(name, (name, DETERMINISTIC_OPTIONS.get(name, {})))
    assert_every_rank_equals_one_process(fsdp_results, name, run(optimizer, options, None))


def assert_every_rank_equals_one_process(results: list[dict], name: str, expected: dict) -> None:
    """Each rank's weights equal the one-process run's to 1e-10, its counters exactly, and the run trained."""
    for rank, res in enumerate(results):
        got = res[name]
        torch.testing.assert_close(got["params"], expected["params"], rtol=0, atol=1e-10,
                                   msg=lambda m, rank=rank: f"{name} rank {rank}: {m}")
        assert {k: got[k] for k in ("steps", "sam_steps", "grad_evals")} == {
            k: expected[k] for k in ("steps", "sam_steps", "grad_evals")}
    assert not torch.equal(expected["params"], full_params(make_model()))  # it trained


def test_sam_under_fsdp2_mixed_precision_is_sam_to_bf16_rounding(fsdp_results):
    """``MixedPrecisionPolicy(param_dtype=bfloat16)``: the forward and backward run in bf16 on the all-gathered
    weights, the optimizer perturbs and updates the float64 shards. The run stays within bf16 rounding of the
    float64 SAM run, much closer to it than to ERM's (so the perturbation reached the bf16 forward), and every
    rank ends with the same weights."""
    r0, r1 = (res["mixed/sam"] for res in fsdp_results)
    assert torch.equal(r0["params"], r1["params"]) and r0["sam_steps"] == STEPS
    sam, erm = run("sam", {}, None)["params"], run("erm", {}, None)["params"]
    rounding = (r0["params"] - sam).abs().max()
    # (measured: 6e-4 from SAM, 1.4e-2 between SAM and ERM)
    assert rounding < 2e-3 and rounding < (erm - sam).abs().max() / 4, (float(rounding), float((erm - sam).abs().max()))


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_train_sharded_with_the_shared_stream_in_step(fsdp_results, name):
    r0, r1 = (res[f"random/{name}"] for res in fsdp_results)
    assert torch.isfinite(r0["params"]).all() and not torch.equal(r0["params"], full_params(make_model()))
    assert r0["streams"] and len(r0["streams"]) == len(r1["streams"])
    for s0, s1 in zip(r0["streams"], r1["streams"], strict=True):  # one shared state: a checkpoint holds it once
        assert torch.equal(s0, s1)
    assert {k: r0[k] for k in ("steps", "sam_steps", "grad_evals")} == {
        k: r1[k] for k in ("steps", "sam_steps", "grad_evals")}
    assert r0["steps"] == STEPS


def test_shard_stream_gives_each_shard_its_own_numbers_and_replicas_the_same(fsdp_results):
    d0, d1 = (res["draws"] for res in fsdp_results)
    # different shards: different numbers (a shared stream would give both halves the same ones)
    assert not torch.allclose(d0["shard"]["values"], d1["shard"]["values"])
    # replicas of one layout (HSDP's replicate dimension): equal numbers
    assert torch.equal(d0["replicate"]["values"], d1["replicate"]["values"])
    # a new stream every step, and the shared generator moves on alike on every rank
    assert not torch.equal(d0["shard"]["values"][0], d0["shard"]["values"][1])
    assert torch.equal(d0["shard"]["shared"], d1["shard"]["shared"])
    assert not torch.equal(d0["shard"]["shared"], torch.Generator().manual_seed(5).get_state())
    # N(0, 1) draws: a loose check that the stream is a normal one (24 numbers per rank and step)
    both = torch.cat([d0["shard"]["values"].reshape(-1), d1["shard"]["values"].reshape(-1)])
    assert abs(float(both.mean())) < 0.5 and 0.5 < float(both.std()) < 1.5


def test_norms_and_inner_products_sum_over_shards_only(fsdp_results):
    for res in fsdp_results:
        got = res["reductions"]
        assert got["squared_norm"] == pytest.approx(got["expected_squared_norm"], rel=1e-12)
        assert got["dot"] == pytest.approx(got["expected_dot"], rel=1e-12)


def test_nan_loss_on_one_rank_stops_every_rank_with_weights_unchanged(fsdp_results):
    for rank, res in enumerate(fsdp_results):
        nan = res["nan"]
        assert nan["raised"] is not None, f"rank {rank} applied the step"
        assert "non-finite" in nan["raised"]  # (rank 0: its reduce-scattered gradient carries rank 1's NaN)
        assert torch.equal(nan["before"], nan["after"]) and nan["steps"] == 1
    assert "another rank" in fsdp_results[0]["nan"]["raised"]  # rank 0's own losses were finite


def test_inf_in_one_ranks_shard_flags_the_scaler_step_on_every_rank(fsdp_results):
    assert [res["unscale"] for res in fsdp_results] == [pytest.approx(0.5), pytest.approx(0.5)]  # mean of 0 and 1


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_settings_that_cannot_run_sharded_refuse_at_construction(fsdp_results, name):
    for res in fsdp_results:
        message = res[f"refused/{name}"]
        assert message is not None and "sharded by FSDP2" in message and "use" in message


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_per_rank_checkpoint_resumes_the_sharded_run_exactly(fsdp_results, name):
    for res in fsdp_results:
        got = res[f"resume/{name}"]
        assert torch.equal(got["resumed"], got["straight"])
    if name == "looksam":  # the stored direction is saved as this rank's shard of a DTensor
        from torch.distributed.tensor import DTensor

        param_state = native(fsdp_results[0]["resume/looksam"]["state"])["sharpness"]["param_state"]
        directions = [s["reuse_direction"] for s in param_state.values() if "reuse_direction" in s]
        assert directions and all(isinstance(d, DTensor) for d in directions)


@pytest.mark.parametrize("name", list(DCP))
def test_a_dcp_checkpoint_resumes_the_sharded_run_exactly(fsdp_results, name):
    """``torch.distributed.checkpoint`` on FSDP2: each rank saves its shards (the wrapper's state included) and
    a fresh sharded model and optimizer resume the run bit for bit."""
    for res in fsdp_results:
        got = res[f"dcp/{name}"]
        assert torch.equal(got["resumed"], got["straight"])
        assert got["resumed_counters"] == got["counters"] and got["loaded_counters"]["steps"] == 3


@pytest.mark.parametrize("name", list(DCP))
def test_a_gathered_state_dict_on_rank_0_resumes_the_sharded_run_exactly(fsdp_results, name):
    """``StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)``: rank 0 holds the whole state dict
    (weights and optimizer, the wrapper's state included), the others nothing; loading broadcasts and shards it,
    and the run continues bit for bit."""
    for res in fsdp_results:
        got = res[f"dcp/{name}"]
        assert torch.equal(got["from_full"], got["straight"])
        assert got["from_full_counters"] == got["counters"]


def _one_process_resume(name: str, load) -> torch.Tensor:
    """An unsharded model and optimizer, ``load(model, opt)``, then the last 3 steps on the global batch."""
    model = make_model()
    opt = build(name, model, **DCP[name])
    load(model, opt)
    assert opt.steps == 3
    train(opt, model, global_batches(STEPS)[3:])
    return full_params(model)


def test_adaptive_smoothout_needs_whole_filters(fsdp_results):
    """AdaSmoothOut scales each filter's (row's) noise by its norm: under FSDP2's Shard(0) every row is on one
    rank and it trains; a parameter sharded by columns (``shard_placement_fn``) would give partial norms, so it is
    refused at construction, while the plain SmoothOut builds on the same model."""
    for res in fsdp_results:
        got = res["adaptive-smoothout"]
        assert got["steps"] == 2 and got["plain_builds"]
        assert got["refused"] is not None and "whole filters" in got["refused"] and "Shard(dim=1)" in got["refused"]


def test_a_sharded_dcp_checkpoint_resumes_in_one_process(fsdp_results):
    """Resharding: the 2-rank DCP checkpoint loaded by one process (no process group) continues as the one-process
    run on the global batch does (the sharded run equals that run to rounding, see above)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def load(model, opt):
        target = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(target, checkpoint_id=fsdp_results[0]["dcp/looksam"]["path"])
        model.load_state_dict(target["model"])
        set_optimizer_state_dict(model, opt, target["optim"])

    expected = run("looksam", DCP["looksam"], None)["params"]
    torch.testing.assert_close(_one_process_resume("looksam", load), expected, rtol=0, atol=1e-10)


def test_the_full_state_dict_of_a_sharded_run_loads_into_one_process(fsdp_results):
    """``StateDictOptions(full_state_dict=True, cpu_offload=True)`` gathers the shards, the wrapper's per-parameter
    state included, keyed by parameter name; a plain ``load_state_dict`` in one process resumes from it."""
    full = fsdp_results[0]["dcp/looksam"]["full"]
    assert all(isinstance(k, str) for k in full["optim"]["state"])  # parameter names, as DCP keys them
    directions = [s["sharpness_reuse_direction"] for s in full["optim"]["state"].values()]
    assert len(directions) == 4 and all(type(d) is torch.Tensor for d in directions)

    def load(model, opt):
        model.load_state_dict(full["model"])
        opt.load_state_dict(full["optim"])

    expected = run("looksam", DCP["looksam"], None)["params"]
    torch.testing.assert_close(_one_process_resume("looksam", load), expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- HSDP
#: HSDP: 4 ranks on a (replicate 2, shard 2) mesh; each rank takes a quarter of the global batch
HSDP_WORLD = 4
HSDP_DETERMINISTIC = {"sam": {}, "asam": {}, "looksam": {"k": 3}, "gnr": {}, "aesam": DETERMINISTIC_OPTIONS["aesam"]}
HSDP_RANDOM = {"tracesam": {}, "smoothout": {}}


def _hsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    run_scenarios(rank, init_file, out_dir, HSDP_WORLD, COLLECTIVE_TIMEOUT_S, _hsdp_scenarios)


def _hsdp_scenarios(rank: int, result: dict):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from sharpness.optim._generator import shard_stream

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    result["coordinate"] = mesh.get_coordinate()
    like = distribute_tensor(torch.zeros(8, 3), mesh, [Replicate(), Shard(0)])
    result["draw"] = torch.randn(4, 3, generator=shard_stream(torch.Generator().manual_seed(5), like))
    for name, options in {**HSDP_DETERMINISTIC, **HSDP_RANDOM}.items():
        yield f"hsdp/{name}"
        result[name] = run(name, options, rank, mesh, HSDP_WORLD)


@pytest.fixture(scope="module")
def hsdp_results(tmp_path_factory):
    return run_spawned(_hsdp_worker, HSDP_WORLD, tmp_path_factory.mktemp("hsdp"), JOIN_TIMEOUT_S)


@pytest.mark.parametrize("name", list(HSDP_DETERMINISTIC))
def test_hsdp_run_equals_one_process_on_the_global_batch(hsdp_results, name):
    """HSDP: norms and inner products are summed over the shard dimension only (the replicas hold the same
    numbers, summing them too would double them), so the run is still the one-process run."""
    assert_every_rank_equals_one_process(hsdp_results, name, run(name, HSDP_DETERMINISTIC[name], None))


def test_hsdp_replicas_of_a_shard_draw_the_same_numbers(hsdp_results):
    """:func:`shard_stream` on a (Replicate, Shard(0)) DTensor: seeded from the shard coordinate only, so the
    two replicas of a shard draw equal numbers and the two shards different ones."""
    draws = {tuple(res["coordinate"]): res["draw"] for res in hsdp_results}
    assert sorted(draws) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for shard_index in (0, 1):
        assert torch.equal(draws[(0, shard_index)], draws[(1, shard_index)])
    assert not torch.equal(draws[(0, 0)], draws[(0, 1)])


@pytest.mark.parametrize("name", list(HSDP_RANDOM))
def test_hsdp_random_methods_keep_every_rank_in_step(hsdp_results, name):
    """The random methods train under HSDP with the same weights and the shared stream in step on every rank."""
    first = hsdp_results[0][name]
    assert not torch.equal(first["params"], full_params(make_model()))
    for res in hsdp_results[1:]:
        assert torch.equal(res[name]["params"], first["params"])
        assert all(torch.equal(a, b) for a, b in zip(res[name]["streams"], first["streams"], strict=True))
