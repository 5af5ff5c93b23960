"""The ``sharpness`` command line: list what is available, train a run into the experiments store.

Examples::

    sharpness list
    sharpness train --dataset mnist1d --model cnn1d --optimizer aesam --epochs 20 --seed 0 --db results.sqlite
    sharpness train --optimizer sam --budget-grad-evals 4000 --opt rho=0.1
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, NoReturn, Optional

import typer

from .harness import Store, TrainConfig, environment, run_key, train
from .harness.sweep import USER_ERRORS
from .harness.train import check_compile_backend, distributed_context, resolve_device

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sharpness-aware training and measurement.")

_COMPILE_HELP = "torch.compile the model with this backend (inductor, aot_eager, ...); default: eager"


def _resolve_runtime(device: str, compile_backend: str | None) -> Any:
    """The ``--device`` option as a torch.device, after checking ``--compile`` (typer parameter errors)."""
    try:
        check_compile_backend(compile_backend)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--compile") from exc
    try:
        return resolve_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc


_PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}


def _parse_options(pairs: list[str] | None, flag: str) -> dict[str, object]:
    """``["rho=0.1", "k=5"]`` -> ``{"rho": 0.1, "k": 5}`` (values parsed as JSON when they are JSON; Python's
    ``True``, ``False`` and ``None`` are read as JSON's ``true``, ``false`` and ``null``, not as strings)."""
    options: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        try:
            value = json.loads(_PYTHON_LITERALS.get(raw, raw))
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN, Infinity, 1e400
            raise typer.BadParameter(f"{pair!r} is not a finite number", param_hint=flag)
        options[key] = value
    return options


def _parse_milestones(text: str | None) -> tuple[float, ...]:
    """``"0.25,0.5,0.75"`` -> ``(0.25, 0.5, 0.75)``; the values themselves are checked by ``TrainConfig``."""
    if text is None:
        return ()
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated fractions such as 0.25,0.5,0.75, got {text!r}",
                                 param_hint="--lr-milestones") from None


@app.command("list")
def list_command(
    what: Annotated[str, typer.Argument(help="optimizers, datasets, models, measures or all")] = "all",
) -> None:
    """List the registered optimizers, datasets, models and measures with one-line descriptions."""
    from .data import list_datasets
    from .models import list_models
    from .registry import list_optimizers

    from .harness.measure import describe_measures

    def list_measures() -> list[Any]:
        return [SimpleNamespace(name=n, description=d) for n, d in describe_measures().items()]

    tables = {"optimizers": list_optimizers, "datasets": list_datasets, "models": list_models,
              "measures": list_measures}
    if what != "all" and what not in tables:
        raise typer.BadParameter(f"unknown kind {what!r} (expected one of all, {', '.join(tables)})", param_hint="WHAT")
    for kind, lister in tables.items():
        if what in ("all", kind):
            typer.echo(f"{kind}:")
            for info in lister():
                typer.echo(f"  {info.name:<16} {info.description}")


@app.command("train")
def train_command(
    dataset: Annotated[str, typer.Option(help="registered dataset (see `sharpness list datasets`)")] = "mnist1d",
    model: Annotated[str, typer.Option(help="registered model (see `sharpness list models`)")] = "cnn1d",
    optimizer: Annotated[str, typer.Option(help="registered optimizer; 'erm' is the base optimizer alone")] = "aesam",
    base: Annotated[str, typer.Option(help="base optimizer: sgd, adam or adamw")] = "sgd",
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="weight decay")] = 5e-4,
    base_opt: Annotated[Optional[list[str]], typer.Option(
        help="base optimizer option KEY=VALUE, repeatable (e.g. --base-opt nesterov=true, --base-opt "
             "betas=[0.9,0.95], --base-opt eps=1e-6)")] = None,
    decay_biases_and_norms: Annotated[bool, typer.Option(
        "--decay-biases-and-norms/--no-decay-biases-and-norms",
        help="whether parameters with at most one dimension (biases, norm scales) get weight decay")] = True,
    batch_size: Annotated[int, typer.Option(help="mini-batch size (examples)")] = 64,
    epochs: Annotated[Optional[int], typer.Option(help="budget in epochs (default 30 when no budget is given)")] = None,
    budget_steps: Annotated[Optional[int], typer.Option(help="budget in optimizer steps")] = None,
    budget_grad_evals: Annotated[Optional[int], typer.Option(
        help="budget in gradient evaluations (forward+backward passes): equal compute for every method")] = None,
    schedule: Annotated[str, typer.Option(
        help="LR schedule over the budget: constant, step, cosine or multistep")] = "cosine",
    lr_milestones: Annotated[Optional[str], typer.Option(
        help="multistep: fractions of the budget where the lr is multiplied by --lr-gamma, e.g. 0.25,0.5,0.75")] = None,
    lr_gamma: Annotated[float, typer.Option(help="multistep: the lr's factor at each milestone")] = 0.1,
    warmup: Annotated[float, typer.Option(
        help="linear lr warm-up from 0 over this fraction of the budget; the schedule runs over the rest")] = 0.0,
    label_smoothing: Annotated[float, typer.Option(help="label smoothing in [0, 1)")] = 0.0,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="clip the final gradient to this L2 norm")] = None,
    bf16: Annotated[bool, typer.Option("--bf16/--fp32", help="bf16 autocast for forward passes")] = False,
    label_noise: Annotated[float, typer.Option(help="fraction of training labels flipped to another class")] = 0.0,
    subset: Annotated[float, typer.Option(help="fraction of the training set kept")] = 1.0,
    subset_strategy: Annotated[str, typer.Option(
        help="how --subset picks: stratified (seeded, per class) or first (in stored order)")] = "stratified",
    validation: Annotated[float, typer.Option(help="fraction of training data held out for validation")] = 0.0,
    seed: Annotated[int, typer.Option(help="seed of initialisation, data order and data transforms")] = 0,
    opt: Annotated[Optional[list[str]], typer.Option(
        help="optimizer option KEY=VALUE, repeatable (e.g. --opt rho=0.1 --opt k=5)")] = None,
    langevin_batches: Annotated[str, typer.Option(
        help="Entropy-SGD's Langevin passes 2..L: on the step's mini-batch (same) or a fresh one each (fresh, the "
             "paper's Algorithm 1)")] = TrainConfig.langevin_batches,
    model_opt: Annotated[Optional[list[str]], typer.Option(help="model option KEY=VALUE, repeatable")] = None,
    data_opt: Annotated[Optional[list[str]], typer.Option(
        help="data-set option KEY=VALUE, repeatable (e.g. --data-opt block_size=64)")] = None,
    measure: Annotated[Optional[list[str]], typer.Option(
        help="sharpness measure recorded each epoch, repeatable (see `sharpness list measures`)")] = None,
    measure_every: Annotated[int, typer.Option(help="epochs between measurements")] = 1,
    measure_examples: Annotated[int, typer.Option(
        help="first N training examples the per-epoch measures use")] = TrainConfig.measure_examples,
    measure_rho: Annotated[float, typer.Option(
        help="the per-epoch measures' radius (sam, gnr; salr: 5 + 5 steps of rho/5)")] = TrainConfig.measure_rho,
    measure_samples: Annotated[int, typer.Option(
        help="probe vectors of the per-epoch trace and frobenius measures")] = TrainConfig.measure_samples,
    swa_start: Annotated[Optional[float], typer.Option(
        help="SWA: start averaging at this fraction of the budget, in (0, 1) (default: no SWA)")] = None,
    swa_lr: Annotated[Optional[float], typer.Option(help="SWA: cyclic lr at the start of each cycle (alpha_1)")] = None,
    swa_lr_min: Annotated[Optional[float], typer.Option(
        help="SWA: cyclic lr at the end of each cycle, where weights are averaged (alpha_2; default swa_lr)")] = None,
    swa_cycle: Annotated[Optional[int], typer.Option(help="SWA: cycle length in steps (default: one epoch)")] = None,
    db: Annotated[Optional[Path], typer.Option(help="SQLite results store; the run is written once at the end")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(
        help="directory for per-run checkpoints; an interrupted run resumes from it")] = None,
    download: Annotated[bool, typer.Option(
        "--download", help="fetch the data set if it is not on disk ($SHARPNESS_DATA or ~/.cache/sharpness/data)")] = False,
    device: Annotated[str, typer.Option(
        help="auto (CUDA when available), cpu, cuda, cuda:N or mps; under torchrun cuda is each rank's GPU")] = "auto",
    compile_backend: Annotated[Optional[str], typer.Option(
        "--compile", help=_COMPILE_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the final summary line")] = False,
) -> None:
    """Train one run and print its test accuracy, %SAM and gradient evaluations."""
    if epochs is None and budget_steps is None and budget_grad_evals is None:
        epochs = 30
    resolved = _resolve_runtime(device, compile_backend)
    try:
        config = TrainConfig(
            dataset=dataset, model=model, optimizer=optimizer, base=base, lr=lr, momentum=momentum,
            weight_decay=weight_decay, base_options=_parse_options(base_opt, "--base-opt"),
            decay_biases_and_norms=decay_biases_and_norms, optimizer_options=_parse_options(opt, "--opt"),
            langevin_batches=langevin_batches,
            model_options=_parse_options(model_opt, "--model-opt"), data_options=_parse_options(data_opt, "--data-opt"), batch_size=batch_size, epochs=epochs,
            budget_steps=budget_steps, budget_grad_evals=budget_grad_evals, schedule=schedule,
            lr_milestones=_parse_milestones(lr_milestones), lr_gamma=lr_gamma, warmup=warmup,
            label_smoothing=label_smoothing, max_grad_norm=max_grad_norm, bf16=bf16, label_noise=label_noise,
            subset=subset, subset_strategy=subset_strategy, validation=validation, seed=seed, measures=tuple(measure or ()),
            measure_every=measure_every, measure_examples=measure_examples, measure_rho=measure_rho,
            measure_samples=measure_samples, swa_start=swa_start, swa_lr=swa_lr,
            swa_lr_min=swa_lr_min, swa_cycle=swa_cycle, world_size=distributed_context(resolved)[1])
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    key = run_key(config.to_dict())
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # as `sweep` and --checkpoint-dir do
        store = Store(db) if db is not None else None
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(_describe(exc), param_hint="--db") from exc
    if store is not None and store.has(key):
        typer.echo(f"run {key} is already in {db}; nothing to do")
        return
    checkpoint = None
    if checkpoint_dir is not None:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise typer.BadParameter(_describe(exc), param_hint="--checkpoint-dir") from exc
        checkpoint = checkpoint_dir / f"{key}.pt"
    try:
        result = train(config, checkpoint=checkpoint, log=None if quiet else typer.echo, download=download,
                       device=resolved, compile_backend=compile_backend)
    except USER_ERRORS as exc:
        _fail(exc)
    s = result.summary
    if distributed_context()[0] != 0:
        return
    validated = f"validation accuracy {s['val_acc']:.2%}  " if "val_acc" in s else ""
    typer.echo(f"{config.optimizer} on {config.dataset}/{config.model}: {validated}test accuracy {s['test_acc']:.2%}  "
               f"%SAM {100 * s['sam_fraction']:.1f}  gradient evaluations {s['grad_evals']}  steps {s['steps']}  "
               f"wall time {s['wall_time']:.1f}s  run {key}")
    if store is not None:  # under torchrun only rank 0 gets here and writes the run
        store.write_run(config.to_dict(), s, result.epochs, environment(resolved))
        store.close()


@app.command("measure")
def measure_command(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint written by `sharpness train --checkpoint-dir`")],
    measures: Annotated[str, typer.Option(
        help="comma-separated names from `sharpness list measures`")] = "lambda_max,trace",
    examples: Annotated[int, typer.Option(help="examples measured (the first N of --split, in order)")] = 1000,
    split: Annotated[str, typer.Option(
        help="which split of the run's data set to measure on: train or test")] = "train",
    batch_size: Annotated[int, typer.Option(help="examples per batch inside the measures")] = 500,
    rho: Annotated[float, typer.Option(help="radius of the sam and gnr measures")] = 0.05,
    samples: Annotated[int, typer.Option(help="random probes of the trace and frobenius estimators")] = 100,
    seed: Annotated[int, typer.Option(help="seed of the estimators")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="write the results as JSON to this file")] = None,
    landscape: Annotated[Optional[str], typer.Option(
        help="also plot loss landscapes along random filter-normalized directions: 1d, 2d or 1d,2d")] = None,
    landscape_dir: Annotated[Path, typer.Option(help="directory for the landscape PNGs")] = Path("landscape"),
    points: Annotated[int, typer.Option(help="points per axis of the landscapes")] = 21,
) -> None:
    """Measure the sharpness of a trained checkpoint and print (or write) the values; optionally plot landscapes."""
    from .harness.measure import check_landscape_kinds, landscape_checkpoint, measure_checkpoint

    try:
        if landscape is not None:
            check_landscape_kinds(landscape.split(","))
        result = measure_checkpoint(checkpoint, measures.split(","), examples=examples, batch_size=batch_size,
                                    rho=rho, samples=samples, seed=seed, split=split, out=out)
        pictures = [] if landscape is None else landscape_checkpoint(
            checkpoint, landscape_dir, landscape.split(","), examples=examples, batch_size=batch_size,
            points=points, seed=seed, split=split)
    except USER_ERRORS as exc:
        _fail(exc)
    for picture in pictures:
        typer.echo(f"wrote {picture}")
    for name, m in result["measures"].items():
        stderr = f" +/- {m['stderr']:.4g}" if isinstance(m.get("stderr"), float) else ""
        value = m["value"] if not isinstance(m["value"], float) else f"{m['value']:.6g}"
        typer.echo(f"{name:<12} {value}{stderr}")


@app.command("sweep")
def sweep_command(
    config: Annotated[Path, typer.Argument(help="a TOML (or YAML) sweep file: methods x grid x seeds x datasets")],
    db: Annotated[Optional[Path], typer.Option(
        help="results store (default: the file's `db`, or <stem>.sqlite)")] = None,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(
        help="checkpoint directory (default: from the file)")] = None,
    keep_going: Annotated[bool, typer.Option("--keep-going/--stop-on-error",
                                             help="report a failing run at the end and train the others (it is "
                                                  "not stored: a rerun tries it again)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the planned runs and exit")] = False,
    download: Annotated[bool, typer.Option("--download", help="fetch data sets that are not on disk")] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N or mps")] = "auto",
    compile_backend: Annotated[Optional[str], typer.Option(
        "--compile", help=_COMPILE_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or per-run lines")] = False,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=1,
        help="worker processes training side by side (each run once, through file claims); with --device "
             "cuda they spread over the GPUs, or give a list: --device cuda:0,cuda:1")] = 1,
    threads: Annotated[Optional[int], typer.Option(
        min=1, help="torch threads per worker (default with --jobs: the CPUs divided by the jobs)")] = None,
) -> None:
    """Run every configuration of a sweep that is not yet in the store (rerun after a kill to finish it)."""
    from .harness.sweep import plan_sweep, run_sweep_parallel, worker_devices

    try:
        plan = plan_sweep(config, db=db, checkpoint_dir=checkpoint_dir)
    except USER_ERRORS as exc:
        _fail(exc)
    if dry_run:
        for run_config, key, varied in zip(plan.configs, plan.keys, _varied_settings(plan.configs)):
            typer.echo(f"{key}  {run_config.optimizer:<10} {run_config.dataset}/{run_config.model}  "
                       f"seed {run_config.seed}" + (f"  {varied}" if varied else ""))
        typer.echo(f"{len(plan)} runs planned into {plan.db}")
        return
    _resolve_runtime("cpu", compile_backend)  # --compile checked as a usage error
    try:
        worker_devices(device, jobs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc
    try:
        result = run_sweep_parallel(plan, jobs, log=None if quiet else typer.echo, keep_going=keep_going,
                                    download=download, device=device, compile_backend=compile_backend,
                                    threads=threads)
    except ValueError as exc:
        if "jobs" in str(exc):
            raise typer.BadParameter(str(exc), param_hint="--jobs") from exc
        _sweep_stopped(exc, plan.db)
    except USER_ERRORS as exc:
        _sweep_stopped(exc, plan.db)
    if quiet:  # otherwise the sweep's own last line said it
        typer.echo(f"{result.total} runs: {result.done_before} already done, {result.trained} trained, "
                   f"{len(result.failed)} failed; store {plan.db}")
    for key, error in result.failed:
        typer.echo(f"failed {key}: {error}", err=True)


def _varied_settings(configs: list[TrainConfig]) -> list[str]:
    """Per config, ``key=value`` for the settings that differ across the sweep, beyond the columns the dry run
    prints anyway (optimizer, data set, model, seed); options flattened as ``optimizer_options.rho``."""
    from .harness.report import differing_keys, flat_config

    rows = [flat_config(config.to_dict()) for config in configs]
    varied = differing_keys(rows, ("optimizer", "dataset", "model", "seed"))
    return [" ".join(f"{k}={row[k]}" for k in varied if k in row) for row in rows]


def _sweep_stopped(exc: Exception, db: Path) -> NoReturn:
    """The sweep stopped: one line, as ``train`` reports it; where a run failed (``--stop-on-error``), how to
    go on (not for an error before any run, such as a store it cannot open)."""
    if getattr(exc, "run_key", None) is not None:
        typer.echo(f"error: run {exc.run_key}: {_describe(exc)}\nThe runs finished before it are stored in {db}; "
                   "rerun to resume, or pass --keep-going to train the other runs past a failing one.", err=True)
        raise typer.Exit(code=2) from exc
    _fail(exc)


def _describe(exc: BaseException) -> str:
    """The message of a user-level error; an OS error on a path says which path and why (no errno)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        hint = " (a file is where a directory is needed)" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
            else ""
        path = exc.filename2 if exc.filename2 is not None else exc.filename  # a rename: its target
        return f"cannot use {path}: {exc.strerror}{hint}"
    return str(exc)


def _fail(exc: BaseException) -> NoReturn:
    typer.echo(f"error: {_describe(exc)}", err=True)
    raise typer.Exit(code=2) from exc


@app.command("export")
def export_command(
    db: Annotated[Path, typer.Option(help="the SQLite results store")],
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="one row per run: config.* and summary.*")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="every run with its epochs")] = None,
) -> None:
    """Export the results store as CSV and/or JSON (written atomically)."""
    if csv_path is None and json_path is None:
        raise typer.BadParameter("give --csv FILE and/or --json FILE")
    if not db.is_file():
        typer.echo(f"error: results store not found: {db}", err=True)
        raise typer.Exit(code=2)
    try:
        with Store(db) as store:
            if csv_path is not None:
                store.export_csv(csv_path)
            if json_path is not None:
                store.export_json(json_path)
            typer.echo(f"exported {len(store)} runs")
    except USER_ERRORS as exc:
        _fail(exc)


@app.command("report")
def report_command(
    db: Annotated[Path, typer.Option(help="the SQLite results store to report on")],
    out: Annotated[Path, typer.Option(help="output directory for the page and its PNG figures")] = Path("report"),
    baseline: Annotated[Optional[str], typer.Option(
        help="setting label or optimizer name the others are paired against (default: erm, where the store "
             "has it)")] = None,
    html: Annotated[bool, typer.Option("--html/--markdown", help="write report.html instead of report.md")] = False,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="draw the PNG figures")] = True,
    select: Annotated[str, typer.Option(
        help="the epoch each run is reported at: final, best-val (highest validation accuracy; needs runs "
             "trained with --validation) or best-test (highest test accuracy: optimistic)")] = "final",
) -> None:
    """Tables of mean +/- std over seeds, paired comparisons against a baseline, and figures."""
    from .harness.report import build_report

    try:
        page = build_report(db, out, baseline=baseline or "erm", fmt="html" if html else "markdown",
                            figures=figures, require_baseline=baseline is not None, select=select)
    except USER_ERRORS as exc:
        _fail(exc)
    typer.echo(f"wrote {page}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
