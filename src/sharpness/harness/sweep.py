"""Sweeps: a TOML (or YAML) file expands to many runs; each is trained once, resumably, into the store.

A sweep file (paths are relative to the file; every key is optional)::

    db = "results.sqlite"            # default: <file stem>.sqlite beside the file
    checkpoint_dir = "runs"          # default: <file stem>-checkpoints beside the file
    seeds = [0, 1, 2]                # default: the seed in base (TrainConfig's default 0)
    datasets = ["mnist1d"]           # optional: overrides base.dataset
    [base]                           # TrainConfig fields shared by all runs
    dataset = "mnist1d"
    model = "cnn1d"
    budget_grad_evals = 2500
    [[methods]]                      # one entry per method; its fields override base (default: base alone)
    optimizer = "erm"
    [[methods]]
    optimizer = "sam"
    optimizer_options = { rho = 0.05 }
    grid = { "optimizer_options.rho" = [0.05, 0.1] }   # optional per-method grid (overrides the global one)
    [grid]                           # optional: cartesian product over TrainConfig fields or options
    lr = [0.05, 0.1]                 # ("optimizer_options.X" / "model_options.X" set one option)
    [[variants]]                     # optional: a second axis of field tables (default: base alone),
    label_noise = 0.0                #   e.g. a paper's clean, "-S" and "-C" settings
    [[variants]]
    label_noise = 0.2
    [[overrides]]                    # optional: set fields of every run whose config matches `match`
    match = { dataset = "cifar100", optimizer = "sam" }
    optimizer_options = { rho = 0.1 }
    [[excludes]]                     # optional: leave out every run whose config matches `match`
    match = { dataset = "cifar100", base = "adam" }

Runs are ``datasets x variants x methods x grid points x seeds``, in that order. A run's fields come from
base, then its variant, then its method, then its grid point (``optimizer_options``, ``model_options``,
``data_options`` and ``base_options`` merge key by key; other fields are replaced; a budget set at one level
replaces the budgets of the levels before it). A variant may not set a field (or option) that a method or the
grid also sets. Then every override whose ``match`` holds for the run as those levels define it (each key a
TrainConfig field or ``optimizer_options.X`` / ``model_options.X`` / ``data_options.X`` / ``base_options.X``,
compared with ``==`` to the config's value, defaults included; an override's own changes are not matched by
another) applies its fields, in file order, so a later override wins where two set one field; an override that
matches no run is an error (a typo would otherwise silently change nothing). Overrides encode a paper's
per-setting hyperparameters (its "rho = 0.1 on CIFAR-100") without one file per setting. A run that an
exclude's ``match`` (the only key of an ``[[excludes]]`` table; same keys and comparison as an override's)
holds for is left out; excludes are matched before overrides, against the same view (the run as base,
variant, method and grid define it), so what an override changes cannot exclude a run or save it from
exclusion. An exclude that matches no run is an error (as for overrides; one whose runs another exclude
also leaves out is not), and so is an override that matches only excluded runs (it would change nothing),
or excludes that leave no run. Excludes encode a paper's tables that cover different networks or methods
per data set (SALR's CIFAR-100 table has no Adam half) in one file.
Integers given for float fields (``lr = 1``) become floats, so a run has the same key as from the CLI.
Every config is built and checked (names against the registries, values by ``TrainConfig``) before
anything trains; an excluded run is not checked (a combination that is invalid may be excluded: a run that
does not build is matched against its fields as the levels give them, defaults included). TOML needs
Python >= 3.11 (``tomllib``) or the ``tomli`` package; YAML needs ``pyyaml``.

Crash safety (``kill -9`` at any moment, then rerun): a run enters the store only through
``Store.write_run`` (one transaction, primary key = run key), so it is stored at most once; its checkpoint
(``<checkpoint_dir>/<run_key>.pt``, written atomically after every epoch) is deleted only after the run is
in the store, so nothing is lost. A crash between the two leaves a stale checkpoint that the next run of
the sweep finds the run already stored and deletes.

Several workers (:func:`run_sweep_parallel`, ``sharpness sweep --jobs N``, or independent processes on one
store) train a run only while holding its claim, an ``flock`` on ``<checkpoint_dir>/<run_key>.lock`` that the
OS drops when the process dies (:mod:`sharpness.harness._claims`), so each run is trained by one worker at a
time and the guarantees above hold for the whole group.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import pickle
import queue as queue_module
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._validation import check_int_at_least
from ._claims import can_share, claim, clear_claim
from .config import TrainConfig
from .store import Store, run_key
from .train import check_compile_backend, check_optimizer, environment, resolve_device, train

__all__ = ["SweepPlan", "SweepResult", "load_sweep_file", "plan_sweep", "run_sweep", "run_sweep_parallel",
           "worker_devices"]

Log = Callable[[str], None]

_TOP_KEYS = ("base", "checkpoint_dir", "datasets", "db", "excludes", "grid", "methods", "overrides", "seeds",
             "variants")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_OPTION_FIELDS = ("optimizer_options", "model_options", "data_options", "base_options")
_BUDGETS = ("epochs", "budget_steps", "budget_grad_evals")


@dataclass(frozen=True)
class SweepPlan:
    """An expanded sweep: every run's config (validated), where results go and where checkpoints live."""

    configs: tuple[TrainConfig, ...]
    db: Path
    checkpoint_dir: Path
    source: Path | None = None

    @property
    def keys(self) -> list[str]:
        """The run key of every config, in order."""
        return [run_key(c.to_dict()) for c in self.configs]

    def __len__(self) -> int:
        return len(self.configs)


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` did: ``done_before`` runs were already stored, ``trained`` were trained now,
    ``elsewhere`` were held by other workers of the same sweep."""

    total: int
    done_before: int
    trained: int
    failed: tuple[tuple[str, str], ...] = ()  # (run key, error) for runs that raised, with keep_going=True
    elsewhere: int = 0  # runs another worker was training (claimed) when this one reached them


# ------------------------------------------------------------------------------------------------ reading
def load_sweep_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a sweep file (``.toml``, ``.yaml`` or ``.yml``) into a dict, with clear errors."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"Invalid sweep file type: {path.name!r} (expected a .toml, .yaml or .yml file)")
    if not path.exists():
        raise FileNotFoundError(f"Sweep file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read sweep file {path}: {exc}") from exc
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ModuleNotFoundError as exc:
                raise RuntimeError("Reading a TOML sweep file on Python 3.10 needs the tomli package "
                                   "(pip install tomli), or use Python >= 3.11") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"Invalid TOML in sweep file {path}: {exc}") from exc
    else:
        try:
            import yaml
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"Reading the YAML sweep file {path} needs PyYAML (pip install pyyaml), "
                               "or write it as TOML") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"Invalid YAML in sweep file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TypeError(f"Invalid sweep file {path}: expected a table/mapping at the top level, "
                        f"got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------ planning
def plan_sweep(path: str | os.PathLike[str], *, db: str | os.PathLike[str] | None = None,
               checkpoint_dir: str | os.PathLike[str] | None = None) -> SweepPlan:
    """Read a sweep file and expand it into validated configs (nothing is trained or created).

    Args:
        path: the ``.toml`` / ``.yaml`` sweep file.
        db: overrides the file's ``db`` (relative to the working directory, like any CLI path).
        checkpoint_dir: overrides the file's ``checkpoint_dir``.
    """
    path = Path(path)
    spec = load_sweep_file(path)
    where = path.name
    configs = expand_sweep(spec, where=where)
    here = path.parent
    db_path = Path(db) if db is not None else here / _path_value(spec, "db", f"{path.stem}.sqlite", where)
    ckpt_path = (Path(checkpoint_dir) if checkpoint_dir is not None
                 else here / _path_value(spec, "checkpoint_dir", f"{path.stem}-checkpoints", where))
    return SweepPlan(tuple(configs), db_path, ckpt_path, path)


def expand_sweep(spec: Mapping[str, Any], *, where: str = "sweep") -> list[TrainConfig]:
    """Expand a parsed sweep spec into validated configs (``datasets x variants x methods x grid x seeds``)."""
    unknown = sorted(set(spec) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where} (expected some of {', '.join(_TOP_KEYS)})")
    base = spec.get("base", {})
    if not isinstance(base, Mapping):
        raise TypeError(f"Invalid base value in {where}: {base!r} (expected a table of TrainConfig fields)")
    _check_fields(base, f"{where} [base]")

    methods = _tables(spec, "methods", where)
    variants = _tables(spec, "variants", where)
    for index, variant in enumerate(variants):
        _check_fields(variant, f"{where} variants[{index}]")
    overrides = [_check_override(table, f"{where} overrides[{index}]")
                 for index, table in enumerate(_tables(spec, "overrides", where, default=[]))]
    excludes = [_check_exclude(table, f"{where} excludes[{index}]")
                for index, table in enumerate(_tables(spec, "excludes", where, default=[]))]
    global_grid = _check_grid(spec.get("grid", {}), f"{where} [grid]")

    seeds = spec.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise ValueError(f"Invalid seeds value: {seeds!r} (expected a non-empty list of integers >= 0)")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"Invalid seeds value: {seeds!r} (expected distinct seeds)")
    datasets = spec.get("datasets")
    if datasets is not None:
        if not isinstance(datasets, list) or not datasets or not all(isinstance(d, str) for d in datasets):
            raise ValueError(f"Invalid datasets value: {datasets!r} (expected a non-empty list of dataset names)")
        if len(set(datasets)) != len(datasets):
            raise ValueError(f"Invalid datasets value: {datasets!r} (expected distinct names)")
    for index, (_, fields) in enumerate(overrides):
        _check_conflicts({"override": fields}, seeds, datasets, f"{where} overrides[{index}]")

    configs: list[TrainConfig] = []
    seen: dict[str, str] = {}
    override_matches = [match for match, _ in overrides]
    matched = [0] * len(overrides)
    matched_excluded = [0] * len(overrides)  # runs an override matches that excludes leave out
    excluded = [0] * len(excludes)
    runs = 0
    for dataset in datasets if datasets is not None else [None]:
        for v_index, variant in enumerate(variants):
            v_label = f" variants[{v_index}]" if len(variants) > 1 else ""
            for index, method in enumerate(methods):
                label = f"{where}{v_label} methods[{index}]" + (
                    f" (optimizer={method['optimizer']!r})" if "optimizer" in method else "")
                fields = {k: v for k, v in method.items() if k != "grid"}
                _check_fields(fields, label)
                grid = {**global_grid, **_check_grid(method.get("grid", {}), f"{label} grid")}
                _check_conflicts({"base": base, "variant": variant, "method": fields, "grid": grid}, seeds,
                                 datasets, label)
                _check_variant(variant, fields, grid, label)
                names = list(grid)
                for point in itertools.product(*(grid[n] for n in names)):
                    point_dict = dict(zip(names, point))
                    for seed in seeds if seeds is not None else [None]:
                        context = label + (f", grid point {point_dict}" if point_dict else "") + (
                            f", seed {seed}" if seed is not None else "") + (
                            f", dataset {dataset!r}" if dataset is not None else "")
                        layers = [base, variant, fields, point_dict]
                        axes = {"seed": seed, "dataset": dataset}
                        runs += 1
                        error: Exception | None = None
                        try:
                            config = _build(layers, axes, context)
                        except (TypeError, ValueError) as exc:
                            if not excludes:
                                raise
                            error, current = exc, _merge(layers, axes)  # an invalid run may still be excluded
                        else:
                            current = config.to_dict()
                        chosen = _matching(current, override_matches)
                        left_out = _matching(current, excludes)
                        if left_out:  # before overrides: excludes and overrides see the same run
                            for i in left_out:
                                excluded[i] += 1
                            for i in chosen:
                                matched_excluded[i] += 1
                            continue
                        if error is not None:
                            raise error
                        for i in chosen:
                            matched[i] += 1
                        if chosen:
                            config = _build([*layers, *(overrides[i][1] for i in chosen)], axes,
                                            context + f", overrides {chosen}")
                        key = run_key(config.to_dict())
                        if key in seen:
                            raise ValueError(f"Duplicate run in {where}: {context} is the same config as "
                                             f"{seen[key]} (run {key}); remove one of them")
                        seen[key] = context
                        configs.append(config)
    _check_matched("Exclude", excludes, excluded, where)
    if not configs:
        raise ValueError(f"Invalid excludes in {where}: they leave out all {runs} runs (expected at least one "
                         "run to remain)")
    hidden = [i for i, count in enumerate(matched) if count == 0 and matched_excluded[i]]
    _check_matched("Override", override_matches, matched, where,
                   f"; override(s) {hidden} match only runs that [[excludes]] leave out" if hidden else "")
    return configs


def _tables(spec: Mapping[str, Any], name: str, where: str, default: list[Any] | None = None) -> list[Mapping[str, Any]]:
    """A list of tables (``[[name]]`` in TOML), by default one empty table."""
    tables = spec.get(name, [{}] if default is None else default)
    if not isinstance(tables, list) or (not tables and default is None) or not all(
            isinstance(t, Mapping) for t in tables):
        raise ValueError(f"Invalid {name} value in {where}: {tables!r} (expected a non-empty list of tables, "
                         f"[[{name}]] in TOML)")
    return tables


def _check_override(override: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an override table into its ``match`` (checked keys) and the fields it sets."""
    match = _check_match(override.get("match"), where)
    fields = {k: v for k, v in override.items() if k != "match"}
    if not fields:
        raise ValueError(f"Invalid override in {where}: it sets no field (add the fields to set beside match)")
    _check_fields(fields, where)
    return match, fields


def _check_exclude(exclude: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An exclude table's ``match`` (checked keys); an exclude has no other key, so a field set beside the match
    (meant for an override, or a mistyped match) is an error rather than silently ignored."""
    other = sorted(k for k in exclude if k != "match")
    if other:
        raise ValueError(f"Unknown key(s) {other} in {where} (expected only match = {{ field = value, ... }}; "
                         "to change the fields of matching runs use [[overrides]])")
    return _check_match(exclude.get("match"), where)


def _check_match(match: Any, where: str) -> dict[str, Any]:
    """A ``match`` table of an override or exclude: non-empty, each key a TrainConfig field or a dotted option."""
    if not isinstance(match, Mapping) or not match:
        raise ValueError(f"Invalid match in {where}: {match!r} (expected a non-empty table of field = value, "
                         'e.g. match = { dataset = "cifar100" })')
    for name in match:
        prefix, _, option = name.partition(".")
        if option and prefix not in _OPTION_FIELDS or not option and name not in _FIELDS:
            raise ValueError(f"Unknown match key {name!r} in {where} (expected a TrainConfig field or "
                             f"{' / '.join(f'{o}.X' for o in _OPTION_FIELDS)})")
    return dict(match)


def _check_matched(kind: str, matches: list[dict[str, Any]], counts: list[int], where: str, hint: str = "") -> None:
    """An override or exclude that matches no run is an error: a typo in its match would otherwise silently change
    (or leave out) nothing."""
    unused = [i for i, count in enumerate(counts) if count == 0]
    if unused:
        raise ValueError(f"{kind}(s) {unused} in {where} match no run: "
                         + "; ".join(f"match = {matches[i]}" for i in unused)
                         + f" (check the field names and values against the runs that --dry-run lists{hint})")


def _check_variant(variant: Mapping[str, Any], method: Mapping[str, Any], grid: Mapping[str, Any],
                   where: str) -> None:
    """A variant and a method (or the grid) must not both set one field or option: which wins would be a guess."""
    def keys(layer: Mapping[str, Any]) -> set[str]:
        flat = set()
        for name, value in _layer(layer).items():
            flat |= {f"{name}.{k}" for k in value} if name in _OPTION_FIELDS else {name}
        if flat & set(_BUDGETS):
            flat |= {"budget"}
        return flat

    clash = sorted(keys(variant) & (keys(method) | keys(grid)))
    if clash:
        raise ValueError(f"Conflicting {', '.join(clash)} in {where}: set by its variant and by the method or grid "
                         "(set it in one place only, or use [[overrides]])")


def _layer(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fields with dotted option keys (``optimizer_options.rho = 0.1``) folded into their option tables."""
    layer: dict[str, Any] = {}
    for name, value in fields.items():
        prefix, _, option = name.partition(".")
        if option:
            layer[prefix] = {**layer.get(prefix, {}), option: value}
        elif name in _OPTION_FIELDS and isinstance(value, Mapping):
            layer[name] = {**layer.get(name, {}), **value}
        else:
            layer[name] = value
    return layer


def _matching(config: Mapping[str, Any], matches: list[dict[str, Any]]) -> list[int]:
    """The indices of the ``match`` tables (of overrides or excludes) that hold for ``config``."""
    return [i for i, match in enumerate(matches) if _matches(config, match)]


def _matches(config: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    """Whether every key of ``match`` equals the config's value (a field or dotted option; an unset field counts
    as its TrainConfig default, an unset option matches nothing)."""
    missing = object()
    for name, wanted in match.items():
        prefix, _, option = name.partition(".")
        if option:
            options = config.get(prefix, {})  # not a table only in a run that did not build (see expand_sweep)
            value = options.get(option, missing) if isinstance(options, Mapping) else missing
        else:
            value = config.get(name, missing)
        if value is missing:
            if option or name not in _FIELDS:
                return False
            field = _FIELDS[name]  # a field to_dict leaves out at its default (subset_strategy, data_options, ...)
            value = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if isinstance(value, tuple):
            value = list(value)
        if value != wanted:
            return False
    return True


def _path_value(spec: Mapping[str, Any], name: str, default: str, where: str) -> str:
    value = spec.get(name, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"Invalid {name} value in {where}: {value!r} (expected a non-empty path string)")
    return value


def _check_fields(fields: Mapping[str, Any], where: str) -> None:
    unknown = sorted(name for name in fields if name not in _FIELDS and name.partition(".")[0] not in _OPTION_FIELDS)
    if unknown:
        hint = ("; top-level keys such as " + ", ".join(repr(k) for k in unknown if k in _TOP_KEYS)
                + " go before the first [table] in TOML") if set(unknown) & set(_TOP_KEYS) else ""
        raise ValueError(f"Unknown key(s) {unknown} in {where} (expected TrainConfig fields: "
                         f"{', '.join(sorted(_FIELDS))}{hint})")
    for name in _OPTION_FIELDS:
        if name in fields and not isinstance(fields[name], Mapping):
            raise TypeError(f"Invalid {name} type in {where}: {type(fields[name]).__name__} (expected a table of "
                            "options)")


def _check_grid(grid: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(grid, Mapping):
        raise TypeError(f"Invalid grid in {where}: {grid!r} (expected a table of field = [values])")
    for name, values in grid.items():
        prefix, _, option = name.partition(".")
        if option:
            if prefix not in _OPTION_FIELDS:
                raise ValueError(f"Unknown grid key {name!r} in {where} (dotted keys must start with "
                                 f"{' or '.join(_OPTION_FIELDS)}, e.g. optimizer_options.rho)")
        elif name not in _FIELDS:
            raise ValueError(f"Unknown grid key {name!r} in {where} (expected TrainConfig fields: "
                             f"{', '.join(sorted(_FIELDS))}, or optimizer_options.X / model_options.X)")
        if not isinstance(values, list) or not values:
            raise ValueError(f"Invalid grid values for {name!r} in {where}: {values!r} (expected a non-empty list)")
    return dict(grid)


def _check_conflicts(sections: Mapping[str, Mapping[str, Any]], seeds: Any, datasets: Any, where: str) -> None:
    """Neither ``seed`` nor ``dataset`` may be set in a section (base, variant, method, grid, override) when the
    sweep's ``seeds`` / ``datasets`` list sets it."""
    for name, plural, given in (("seed", "seeds", seeds), ("dataset", "datasets", datasets)):
        if given is None:
            continue
        clash = [section for section, fields in sections.items() if name in fields]
        if clash:
            raise ValueError(f"Conflicting {name} in {where}: set in {', '.join(clash)} and by {plural} = "
                             f"{given!r} (set it in one place only)")


def _build(layers: list[Mapping[str, Any]], axes: Mapping[str, Any], context: str) -> TrainConfig:
    """A config from layers of fields applied in order (see :func:`_merge`), checked."""
    values = _merge(layers, axes)
    try:
        config = TrainConfig(**values)
        _check_names(config)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{context}: {exc}") from exc
    return config


def _merge(layers: list[Mapping[str, Any]], axes: Mapping[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields that layers of fields applied in order set (options merge key by key; a layer that
    sets a budget replaces the budgets of the layers before it), then the axes (seed, dataset) that are given;
    unchecked, and without the fields no layer sets."""
    values: dict[str, Any] = {name: {} for name in _OPTION_FIELDS}
    budget_set = False
    for layer in map(_layer, layers):
        if any(b in layer for b in _BUDGETS):
            values.update(dict.fromkeys(_BUDGETS))
            budget_set = True
        for name, value in layer.items():
            if name in _OPTION_FIELDS and isinstance(value, Mapping):
                values[name] = {**values[name], **value}
            else:
                values[name] = value
    values.update({name: value for name, value in axes.items() if value is not None})
    if not budget_set:
        for name in _BUDGETS:  # TrainConfig's default budget (epochs=20)
            values.pop(name, None)
    return values


def _check_names(config: TrainConfig) -> None:
    from ..data import get_dataset_info
    from ..models import get_model_info

    get_dataset_info(config.dataset)
    get_model_info(config.model)
    check_optimizer(config)  # the name, the option names and values, and a budget of at least one step


# ------------------------------------------------------------------------------------------------ running
def run_sweep(plan: SweepPlan, *, log: Log | None = print, progress: bool = True,
              keep_going: bool = False, download: bool = False,
              device: str | torch.device | None = "auto", compile_backend: str | None = None) -> SweepResult:
    """Train every run of ``plan`` that is not yet in its store; safe to kill and rerun at any moment.

    For each config: skip it if ``store.has(run_key)`` (deleting a stale checkpoint); otherwise claim it
    (skip it if another worker holds it; see the module docstring), train with the checkpoint
    ``checkpoint_dir/<run_key>.pt`` (resumed if present), write the run to the store, delete the checkpoint
    and release the claim.

    Args:
        log: called with one line per run (``None``: quiet).
        progress: show a progress bar (``rich``, if installed).
        keep_going: record a run that raises (e.g. diverges) in ``SweepResult.failed`` and go on to the next;
            by default the error stops the sweep (finished runs stay stored).
        download: fetch a data set that is not on disk (``load_dataset(download=True)``).
        device: where every run trains (see :func:`~sharpness.harness.train`); recorded in each run's
            environment, not part of its identity.
        compile_backend: ``torch.compile`` backend for every run (see :func:`~sharpness.harness.train`);
            recorded in each run's environment, not part of its identity.
    """
    device = resolve_device(device)
    compile_backend = check_compile_backend(compile_backend)
    plan.db.parent.mkdir(parents=True, exist_ok=True)
    plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    total, done_before, trained, elsewhere = len(plan.configs), 0, 0, 0
    failed: list[tuple[str, str]] = []
    env = environment(device)
    if compile_backend is not None:
        env["compile_backend"] = compile_backend
    cache: dict[tuple, Any] = {}
    say = log if log is not None else (lambda line: None)
    with Store(plan.db) as store, _progress_bar(total, enabled=progress) as advance:
        for number, config in enumerate(plan.configs, start=1):
            key = run_key(config.to_dict())
            checkpoint = plan.checkpoint_dir / f"{key}.pt"
            name = f"[{number}/{total}] run {key} {config.optimizer} on {config.dataset}/{config.model} " \
                   f"seed {config.seed}"
            if store.has(key):
                done_before += 1
                _remove_checkpoint(checkpoint)  # a crash after write_run, before the deletion, left it behind
                clear_claim(plan.checkpoint_dir, key)  # and maybe its lock file
                say(f"{name}: already in {plan.db.name}")
                advance()
                continue
            held = claim(plan.checkpoint_dir, key)
            if held is None:
                elsewhere += 1
                say(f"{name}: being trained by another worker")
                advance()
                continue
            with held:
                if store.has(key):  # another worker stored it between the check and the claim
                    done_before += 1
                    say(f"{name}: already in {plan.db.name}")
                    advance()
                    continue
                resuming = checkpoint.exists()
                try:
                    result = train(config, data=_load_data(config, cache, download), checkpoint=checkpoint,
                                   log=None, device=device, compile_backend=compile_backend)
                except Exception as exc:
                    if not keep_going:
                        exc.run_key = key  # type: ignore[attr-defined]  # a run failed (pickles with it)
                        raise
                    failed.append((key, f"{type(exc).__name__}: {exc}"))
                    say(f"{name}: FAILED ({type(exc).__name__}: {exc})")
                    advance()
                    continue
                store.write_run(config.to_dict(), result.summary, result.epochs, env)
                _remove_checkpoint(checkpoint)
            trained += 1
            s = result.summary
            say(f"{name}: {'resumed, ' if resuming else ''}test acc {s['test_acc']:.2%}  "
                f"grad evals {s['grad_evals']}  {s['wall_time']:.1f}s")
            advance()
    say(f"sweep: {total} runs, {done_before} already stored, {trained} trained now"
        + (f", {len(failed)} failed" if failed else "")
        + (f", {elsewhere} being trained by other workers" if elsewhere else "") + f" -> {plan.db}")
    return SweepResult(total, done_before, trained, tuple(failed), elsewhere)


def run_sweep_parallel(plan: SweepPlan, jobs: int, *, log: Log | None = print, keep_going: bool = False,
                       download: bool = False, device: str | torch.device | None = "auto",
                       compile_backend: str | None = None, threads: int | None = None) -> SweepResult:
    """Train the runs of ``plan`` that are not stored yet with ``jobs`` worker processes side by side.

    Each worker is :func:`run_sweep` on the same plan in a process of its own: the workers share the store and
    the checkpoint folder and take runs through exclusive claims (see :mod:`sharpness.harness._claims`), so each
    run is trained by one worker, once. Everything :func:`run_sweep` promises still holds: kill the workers (or
    this process) at any moment and run the sweep again, and every run ends up stored exactly once; a run that
    was cut short resumes from its checkpoint. Independent ``sharpness sweep`` processes (on other machines
    sharing the folder, say) cooperate the same way.

    Args:
        jobs: worker processes, ``>= 1``; at most one per run left to train. With one worker (or one run left),
            :func:`run_sweep` runs in this process, with a progress bar when ``log`` is set.
        device: where the workers train. ``"cuda"`` (or ``"auto"`` on a machine with GPUs) spreads them over
            every visible GPU, worker ``i`` on ``cuda:(i % device_count)``; a comma-separated list
            (``"cuda:0,cuda:1"``) assigns them round-robin; any other device is shared by all.
        threads: ``torch.set_num_threads`` in each worker (default: the CPUs this process may use, divided
            by ``jobs``, at least 1). A run's numbers do not depend on which worker trains it, except that on the
            CPU a different thread count may change the rounding of its reductions.
        log, keep_going, download, compile_backend: as for :func:`run_sweep`; each worker's lines are prefixed
            with ``[worker i]``.

    Returns:
        The whole sweep: ``done_before`` counts the runs stored before the workers started, ``trained`` those
        they trained, ``failed`` the runs that raised (``keep_going``), ``elsewhere`` the runs still unstored
        at the end that no worker failed (another process outside this call was training them).

    Every data source of the sweep is loaded once in this process before the workers start (a download
    happens once; a missing file fails here, before anything trains).

    Raises:
        The first error of a worker (``keep_going=False``): the other workers are killed at once, which is
        safe by the guarantee above.
    """
    jobs = check_int_at_least("jobs", jobs, 1)
    if threads is not None:
        threads = check_int_at_least("threads", threads, 1)
    if jobs > 1 and not can_share():
        raise ValueError(f"Invalid jobs value: {jobs} (parallel sweeps need POSIX file locks, which this "
                         "platform lacks; use jobs=1)")
    devices = worker_devices(device, jobs)
    compile_backend = check_compile_backend(compile_backend)
    plan.db.parent.mkdir(parents=True, exist_ok=True)
    plan.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    keys = plan.keys
    with Store(plan.db) as store:
        done_before = sum(store.has(key) for key in keys)
    jobs = min(jobs, len(keys) - done_before)  # no idle workers
    if jobs <= 1:  # one worker, or nothing left to share out: this process
        if threads is not None:
            torch.set_num_threads(threads)
        return run_sweep(plan, log=log, progress=log is not None, keep_going=keep_going, download=download,
                         device=devices[0], compile_backend=compile_backend)
    threads = threads or max(1, available_cpus() // jobs)
    _prepare_data(plan, download)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
    queue = context.Queue()
    workers = [context.Process(target=_sweep_worker, name=f"sweep-worker-{i}",
                               args=(i, plan, str(devices[i]), threads, keep_going, download, compile_backend,
                                     log is not None, queue, os.getpid()))
               for i in range(jobs)]
    for worker in workers:
        worker.start()
    results: dict[int, SweepResult] = {}
    try:
        while len(results) < jobs:
            if _receive(queue, results):
                continue
            for i, worker in enumerate(workers):
                if i not in results and worker.exitcode is not None:
                    while _receive(queue, results):  # its last report may land after it exited
                        pass
                    if i not in results:
                        raise RuntimeError(f"sweep worker {i} ended without a result (exit code "
                                           f"{worker.exitcode}); run the sweep again to finish it")
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        queue.close()
    failed = dict(pair for i in sorted(results) for pair in results[i].failed)  # a run failed by two workers once
    with Store(plan.db) as store:
        stored = {key for key in keys if store.has(key)}
    failed = {key: error for key, error in failed.items() if key not in stored}  # not if a retry stored it
    unstored = [key for key in keys if key not in stored and key not in failed]
    result = SweepResult(len(keys), done_before, sum(r.trained for r in results.values()), tuple(failed.items()),
                         len(unstored))
    if log is not None:
        log(f"sweep: {result.total} runs, {result.done_before} already stored, {result.trained} trained now by "
            f"{jobs} workers" + (f", {len(result.failed)} failed" if result.failed else "")
            + (f", {result.elsewhere} being trained elsewhere" if result.elsewhere else "") + f" -> {plan.db}")
    return result


def _prepare_data(plan: SweepPlan, download: bool) -> None:
    """Load every data source of ``plan`` once, here, before the workers start: a download happens once (not N
    workers writing one folder at the same time), a missing file is reported once and before anything trains,
    and a generated set (MNIST-1D) is written to its cache for the workers to read."""
    from ..data import load_dataset

    seen: set[tuple[str, str]] = set()
    for config in plan.configs:
        source = (config.dataset, repr(sorted(config.data_options.items())))
        if source not in seen:
            seen.add(source)
            load_dataset(config.dataset, download=download, **config.data_options)


def worker_devices(device: str | torch.device | None, jobs: int) -> list[torch.device]:
    """The device of each of ``jobs`` workers (see :func:`run_sweep_parallel`)."""
    if isinstance(device, str) and "," in device:
        devices = [resolve_device(part.strip()) for part in device.split(",")]
        return [devices[i % len(devices)] for i in range(jobs)]
    resolved = resolve_device(device)
    spread = device is None or (isinstance(device, str) and device in ("auto", "cuda"))
    if resolved.type == "cuda" and spread:
        return [torch.device("cuda", i % torch.cuda.device_count()) for i in range(jobs)]
    return [resolved] * jobs


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: the errors a sweep reports in one line (bad input, a missing file, a diverging run, a path it cannot use)
USER_ERRORS = (TypeError, ValueError, OSError, FloatingPointError)


def _sweep_worker(index: int, plan: SweepPlan, device: str, threads: int, keep_going: bool, download: bool,
                  compile_backend: str | None, verbose: bool, queue: Any, parent: int) -> None:
    """One worker of :func:`run_sweep_parallel`: reports ``(index, "done", SweepResult)`` or
    ``(index, "error", exception)``."""
    torch.set_num_threads(threads)
    _exit_with_parent(parent)

    def log(line: str) -> None:
        print(f"[worker {index}] {line}", flush=True)

    try:
        result = run_sweep(plan, log=log if verbose else None, progress=False, keep_going=keep_going,
                           download=download, device=device, compile_backend=compile_backend)
    except BaseException as exc:  # noqa: BLE001 -- handed to the parent, which raises it
        if not isinstance(exc, (KeyboardInterrupt, *USER_ERRORS)):  # those the parent reports in one line
            traceback.print_exc()  # where in the worker it happened (the parent re-raises the exception alone)
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 -- an exception that cannot cross processes: its text does
            exc = RuntimeError(f"sweep worker {index}: {type(exc).__name__}: {exc}")
        queue.put((index, "error", exc))
        return
    queue.put((index, "done", result))


def _exit_with_parent(parent: int, period: float = 1.0) -> None:
    """End this worker when its parent (pid ``parent``, given by the parent: it may have died before this
    worker got here) dies: after ``kill -9`` of the sweep the re-parented workers trained the whole sweep on.
    Safe at any moment, as a killed worker is: its claim dies with it and its run resumes from the last
    checkpoint on the next sweep."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="sweep-parent-watch", daemon=True).start()


def _receive(queue: Any, results: dict[int, SweepResult], timeout: float = 0.5) -> bool:
    """Take one worker report into ``results`` (a worker's error is raised here); False if none came."""
    try:
        index, outcome, payload = queue.get(timeout=timeout)
    except queue_module.Empty:
        return False
    if outcome == "error":
        raise payload
    results[index] = payload
    return True


def _load_data(config: TrainConfig, cache: dict[tuple, Any], download: bool = False) -> Any:
    """Load the run's data, reusing the previous load when its settings are the same (one entry kept)."""
    from ..data import load_dataset

    options = config.dataset_options()
    settings = (config.dataset, repr(sorted(options.items())))
    if settings not in cache:
        cache.clear()
        cache[settings] = load_dataset(config.dataset, download=download, **options)
    return cache[settings]


def _remove_checkpoint(checkpoint: Path) -> None:
    checkpoint.unlink(missing_ok=True)
    for tmp in checkpoint.parent.glob(f".{checkpoint.name}.tmp-*"):  # left by a kill during save_checkpoint
        tmp.unlink(missing_ok=True)


class _progress_bar:
    """``with _progress_bar(n, enabled=...) as advance:`` -- a rich progress bar, or nothing."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.enabled, self._bar = total, enabled, None

    def __enter__(self) -> Callable[[], None]:
        if self.enabled:
            try:
                from rich.progress import Progress
            except ModuleNotFoundError:
                self.enabled = False
        if not self.enabled:
            return lambda: None
        self._bar = Progress()
        self._bar.__enter__()
        task = self._bar.add_task("sweep", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
