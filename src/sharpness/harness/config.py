"""The typed run configuration (one frozen dataclass; validated on construction, JSON round-trippable)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["BASE_OPTIMIZERS", "SCHEDULES", "TrainConfig"]

BASE_CLASSES: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                                                       "adamw": torch.optim.AdamW}
BASE_OPTIMIZERS = tuple(BASE_CLASSES)
#: keywords of the base optimizers that are not ``base_options``: set by config fields, or not a setting of the run
_NOT_BASE_OPTIONS = frozenset({"params", "lr", "momentum", "weight_decay", "foreach", "fused", "capturable",
                               "differentiable", "maximize", "decoupled_weight_decay"})
SCHEDULES = ("constant", "step", "cosine", "multistep")
LANGEVIN_BATCHES = ("same", "fresh")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (its hash is the run's key in the store).

    Budgets: exactly one of ``epochs``, ``budget_steps`` or ``budget_grad_evals`` is set. With
    ``budget_grad_evals=N`` training stops when the optimizer's gradient-evaluation counter reaches ``N``
    (so SAM gets half the steps of ERM), and the learning-rate schedule follows the fraction of the budget
    spent, so every method sees the same schedule over the same compute.
    """

    dataset: str = "mnist1d"
    model: str = "cnn1d"
    optimizer: str = "erm"
    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # the base optimizer's other keywords (torch.optim.SGD: nesterov, dampening; Adam/AdamW: betas, eps, amsgrad),
    # checked by building it; left out of the run id when empty
    base_options: dict[str, Any] = field(default_factory=dict)
    # False: parameters with at most one dimension (biases, normalization scales and shifts) get no weight decay,
    # the rule of nanoGPT and timm's ViT recipes; left out of the run id at True
    decay_biases_and_norms: bool = True
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # rho, k, alpha, lambda1, ...
    # Entropy-SGD's Langevin passes 2..L (also as SALR's inner optimizer): on the step's mini-batch ("same") or on
    # a fresh one each ("fresh", the paper's Algorithm 1); left out of the run id at "same"
    langevin_batches: str = "same"
    model_options: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)  # the data set's own options (e.g. block_size)
    batch_size: int = 64
    epochs: int | None = 20
    budget_steps: int | None = None
    budget_grad_evals: int | None = None
    schedule: str = "cosine"
    # schedule "multistep": the lr is multiplied by lr_gamma at each of these fractions of the budget (200 epochs
    # with decays at epochs 50, 100 and 150: (0.25, 0.5, 0.75)); both are left out of other schedules' run ids
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = 0.1
    # linear warm-up from 0 over this fraction of the budget, then the schedule over the rest (as transformers'
    # get_cosine_schedule_with_warmup); left out of the run id at 0
    warmup: float = 0.0
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    bf16: bool = False
    label_noise: float = 0.0
    subset: float = 1.0
    subset_strategy: str = "stratified"  # or "first": the first fraction in stored order (the universal-SAM "-S")
    validation: float = 0.0
    seed: int = 0
    measures: tuple[str, ...] = ()  # sharpness measures recorded per epoch (see `sharpness list measures`)
    measure_every: int = 1  # epochs between measurements (the last epoch is always measured)
    measure_examples: int = 512  # first N training examples the measures use
    # the measures' radius (sam, gnr; salr walks 5 + 5 normalized steps of measure_rho / 5) and probe count
    # (trace, frobenius); left out of the run id at their defaults
    measure_rho: float = 0.05
    measure_samples: int = 100
    # SWA (Izmailov et al., 2018): from `swa_start` (fraction of the budget) the lr follows the cyclic schedule
    # swa_lr -> swa_lr_min over `swa_cycle` steps (default one epoch) and the weights are averaged at the end of
    # every cycle; the averaged model (BatchNorm statistics recomputed) is the run's final model.
    swa_start: float | None = None
    swa_lr: float | None = None
    swa_lr_min: float | None = None  # default: swa_lr (a constant SWA rate)
    swa_cycle: int | None = None  # steps per cycle (default: steps per epoch)
    # processes under torchrun: DDP perturbs per worker by default, so the same config on 2 processes is another
    # run (another id); train() fills it in from the process group when it is left at 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("bf16", "decay_biases_and_norms"):  # a truthy string "no" would turn it on
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Invalid {name} type: {type(getattr(self, name)).__name__} (expected bool)")
        for name in ("base_options", "optimizer_options", "model_options", "data_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"Invalid {name} type: {type(getattr(self, name)).__name__} (expected a dict of "
                                "option names to values)")
        self._numbers_as_floats()
        budgets = [name for name in ("epochs", "budget_steps", "budget_grad_evals") if getattr(self, name) is not None]
        if len(budgets) != 1:
            raise ValueError(f"Invalid budget: {budgets or 'none'} set (expected exactly one of epochs, budget_steps, "
                             "budget_grad_evals)")
        for name in budgets + ["batch_size"]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name} value: {value!r} (expected an integer >= 1)")
        if self.base not in BASE_OPTIMIZERS:
            raise ValueError(f"Invalid base value: {self.base!r} (expected one of {', '.join(BASE_OPTIMIZERS)})")
        if self.langevin_batches not in LANGEVIN_BATCHES:
            raise ValueError(f"Invalid langevin_batches value: {self.langevin_batches!r} (expected one of "
                             f"{', '.join(LANGEVIN_BATCHES)})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule value: {self.schedule!r} (expected one of {', '.join(SCHEDULES)})")
        self._check_milestones()
        _check_range("warmup", self.warmup, 0.0, 1.0, high_open=True)
        _check_range("lr", self.lr, 0.0, math.inf, low_open=True)
        _check_range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        self._check_base_options()
        _check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("label_noise", self.label_noise, 0.0, 1.0)
        _check_range("subset", self.subset, 0.0, 1.0, low_open=True)
        from ..data.registry import SUBSET_STRATEGIES

        reserved = sorted({"seed", "label_noise", "subset", "subset_strategy", "validation", "root", "download"}
                          & set(self.data_options))
        if reserved:
            raise ValueError(f"Invalid data_options keys: {reserved} (set them as config fields, not data options)")

        if self.subset_strategy not in SUBSET_STRATEGIES:
            raise ValueError(f"Invalid subset_strategy value: {self.subset_strategy!r} "
                             f"(expected one of {', '.join(SUBSET_STRATEGIES)})")
        _check_range("validation", self.validation, 0.0, 1.0, high_open=True)
        if self.max_grad_norm is not None:
            _check_range("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True)
        object.__setattr__(self, "measures", tuple(self.measures))
        _check_range("measure_rho", self.measure_rho, 0.0, math.inf, low_open=True)
        for name in ("measure_every", "measure_examples", "measure_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name} value: {value!r} (expected an integer >= 1)")
        unused = [name for name in ("measure_rho", "measure_samples") if getattr(self, name) != _DEFAULTS[name]]
        if unused and not self.measures:  # a run id of its own for a setting that changes nothing
            raise ValueError(f"Invalid {'/'.join(unused)}: set without measures (expected measures, e.g. "
                             "measures = ['sam'])")
        if self.measures:
            from .measure import MEASURE_NAMES

            unknown = [m for m in self.measures if m not in MEASURE_NAMES]
            if unknown:
                raise ValueError(f"Unknown measure name(s): {unknown} (expected some of {', '.join(MEASURE_NAMES)})")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Invalid world_size value: {self.world_size!r} (expected an integer >= 1)")
        if self.batch_size < self.world_size:  # each rank's part of a global batch would be empty
            raise ValueError(f"Invalid batch_size value: {self.batch_size} (expected batch_size >= world_size = "
                             f"{self.world_size}: batch_size is the global batch, split across the ranks)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"Invalid seed value: {self.seed!r} (expected an integer >= 0)")
        self._check_swa()

    def _numbers_as_floats(self) -> None:
        """An integer where a float is taken (``lr = 1`` in TOML, ``--opt rho=1``) becomes that float, so the
        config, and the run id hashed from its JSON, is the same as with ``1.0``: without this ``rho=1`` and
        ``rho=1.0`` were two ids, trained twice and counted as two seeds by the report."""
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        for name, owner in (("optimizer_options", self.optimizer), ("model_options", self.model),
                            ("data_options", self.dataset)):
            options = getattr(self, name)
            if options and isinstance(owner, str):  # (a dict: checked before)
                keys = _option_floats(name, owner)
                inner = options.get("inner") if name == "optimizer_options" else None
                inner_keys = _option_floats(name, inner) if isinstance(inner, str) else frozenset()
                keys = keys | inner_keys  # SALR's options for its inner optimizer (e.g. SAM's rho)
                options = {k: _as_float(v) if k in keys else v for k, v in options.items()}
                if isinstance(options.get("inner_options"), dict):  # and those given as SALR's inner_options
                    options["inner_options"] = {k: _as_float(v) if k in inner_keys else v
                                                for k, v in options["inner_options"].items()}
                object.__setattr__(self, name, options)

    def _check_milestones(self) -> None:
        milestones = self.lr_milestones
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, (tuple, list)) or not all(
                isinstance(m, (int, float)) and not isinstance(m, bool) for m in milestones):
            raise TypeError(f"Invalid lr_milestones type: {milestones!r} (expected a sequence of fractions of the "
                            "budget, e.g. (0.25, 0.5, 0.75))")
        milestones = tuple(float(m) for m in milestones)
        object.__setattr__(self, "lr_milestones", milestones)
        if self.schedule != "multistep":
            if milestones or self.lr_gamma != 0.1:
                raise ValueError(f"Invalid lr_milestones/lr_gamma for schedule {self.schedule!r}: they apply to "
                                 "schedule = 'multistep' only")
            return
        if not milestones or any(not 0.0 < m < 1.0 for m in milestones) or any(
                a >= b for a, b in itertools.pairwise(milestones)):
            raise ValueError(f"Invalid lr_milestones value: {milestones} (expected one or more increasing fractions "
                             "of the budget in (0, 1), e.g. (0.25, 0.5, 0.75))")
        _check_range("lr_gamma", self.lr_gamma, 0.0, 1.0, low_open=True)

    def _check_base_options(self) -> None:
        """``base_options`` must name keywords of the base optimizer's constructor that the config does not set
        itself, with values of the default's type (a string ``"no"`` for ``nesterov`` would be true), and the
        base optimizer must accept them (built on a stand-in parameter: torch's own checks, e.g. Nesterov
        without momentum)."""
        allowed = base_option_defaults(self.base)
        unknown = sorted(set(self.base_options) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown base_options key(s) {unknown} for base {self.base!r} (valid keys: "
                             f"{', '.join(sorted(allowed))}; lr, momentum and weight_decay are config fields)")
        options = {}
        for key, value in self.base_options.items():
            default = allowed[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError(f"Invalid base_options.{key} type: {type(value).__name__} (expected bool)")
            elif isinstance(default, tuple):  # Adam's betas; a TOML/JSON list becomes a tuple
                if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != len(
                        default) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                    raise TypeError(f"Invalid base_options.{key} value: {value!r} (expected {len(default)} numbers, "
                                    f"e.g. {list(default)})")
                value = tuple(float(v) for v in value)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"Invalid base_options.{key} type: {type(value).__name__} (expected a number)")
            else:
                value = float(value)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"Invalid base_options.{key} value: {value} (expected a finite number)")
            options[key] = value
        object.__setattr__(self, "base_options", options)
        try:
            self.base_optimizer([torch.zeros(1, requires_grad=True)])
        except ValueError as error:  # torch's message, e.g. "Invalid beta parameter at index 1: 1.5"
            raise ValueError(f"Invalid base_options {options} for base {self.base!r}: {error}") from None

    def base_optimizer(self, params: Iterable[Any]) -> torch.optim.Optimizer:
        """The base optimizer over ``params`` (tensors or param groups): ``base`` with ``lr``, ``momentum`` (SGD),
        ``weight_decay`` and ``base_options``."""
        momentum = {"momentum": self.momentum} if self.base == "sgd" else {}
        return BASE_CLASSES[self.base](params, lr=self.lr, weight_decay=self.weight_decay, **momentum,
                                       **self.base_options)

    _SWA_FIELDS = ("swa_start", "swa_lr", "swa_lr_min", "swa_cycle")

    def _check_swa(self) -> None:
        if self.swa_start is None:
            extra = [name for name in self._SWA_FIELDS[1:] if getattr(self, name) is not None]
            if extra:
                raise ValueError(f"Invalid SWA options: {extra} set without swa_start (expected swa_start in (0, 1))")
            return
        _check_range("swa_start", self.swa_start, 0.0, 1.0, low_open=True, high_open=True)
        if self.swa_lr is None:
            raise ValueError("Invalid swa_lr value: None (SWA needs swa_lr > 0, e.g. 5e-3 as in the SALR paper)")
        _check_range("swa_lr", self.swa_lr, 0.0, math.inf, low_open=True)
        if self.swa_lr_min is not None:
            _check_range("swa_lr_min", self.swa_lr_min, 0.0, self.swa_lr, low_open=True)
        if self.swa_cycle is not None and (isinstance(self.swa_cycle, bool) or not isinstance(self.swa_cycle, int)
                                           or self.swa_cycle < 1):
            raise ValueError(f"Invalid swa_cycle value: {self.swa_cycle!r} (expected an integer >= 1 or None)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.warmup == 0.0:  # likewise for no warm-up
            data.pop("warmup")
        if self.schedule != "multistep":  # other schedules keep the keys (and run ids) they had before it existed
            data.pop("lr_milestones")
            data.pop("lr_gamma")
        if self.swa_start is None:  # runs without SWA keep the keys (and run ids) they had before SWA existed
            for name in self._SWA_FIELDS:
                data.pop(name)
        if self.subset_strategy == "stratified":  # likewise for the default subset strategy
            data.pop("subset_strategy")
        if not self.data_options:  # and for no data-set options
            data.pop("data_options")
        if not self.base_options:  # and for the base optimizer's defaults
            data.pop("base_options")
        if self.decay_biases_and_norms:
            data.pop("decay_biases_and_norms")
        if self.langevin_batches == "same":
            data.pop("langevin_batches")
        if self.world_size == 1:  # and for single-process runs
            data.pop("world_size")
        for name in ("measure_rho", "measure_samples"):  # and for the measures' default settings
            if data[name] == _DEFAULTS[name]:
                data.pop(name)
        return data

    def dataset_options(self) -> dict[str, Any]:
        """The keyword arguments of ``sharpness.data.load_dataset`` that this run's data depends on."""
        return {"seed": self.seed, "label_noise": self.label_noise, "subset": self.subset,
                "subset_strategy": self.subset_strategy, "validation": self.validation, **self.data_options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict` (lists from JSON/TOML become tuples where the field is a tuple)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown config keys: {unknown} (expected some of {', '.join(sorted(known))})")
        return cls(**data)


@functools.cache
def base_option_defaults(base: str) -> dict[str, Any]:
    """The ``base_options`` keys of base optimizer ``base`` and their defaults (torch's signature)."""
    parameters = inspect.signature(BASE_CLASSES[base]).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name not in _NOT_BASE_OPTIONS and p.default is not inspect.Parameter.empty}


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name} type: {type(value).__name__} (expected a number)")
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high and math.isfinite(value)):  # inf would reach the run key's JSON and fail there
        lo = "<" if low_open or math.isinf(low) else "<="
        hi = "<" if high_open or math.isinf(high) else "<="
        raise ValueError(f"Invalid {name} value: {value} (expected {low} {lo} {name} {hi} {high})")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if str(f.type).startswith("float"))


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _float_parameters(functions: Iterable[Callable[..., Any]]) -> frozenset[str]:
    """Names of the parameters that take a float: annotated ``float...`` or with a float default."""
    names = set()
    for function in functions:
        for p in inspect.signature(function).parameters.values():
            annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            if annotation.startswith("float") or isinstance(p.default, float):
                names.add(p.name)
    return frozenset(names)


@functools.cache
def _option_floats(field_name: str, name: str) -> frozenset[str]:
    """The options of optimizer, model or data set ``name`` (by ``field_name``) that take a float; empty for an
    unknown name, which is reported elsewhere (check_optimizer, the registries)."""
    from ..data import get_dataset_info
    from ..models import get_model_info
    from ..registry import get_optimizer_info

    try:
        if field_name == "optimizer_options":  # the constructors down to the engine's
            functions = [k.__dict__["__init__"] for k in get_optimizer_info(name).cls.__mro__
                         if "__init__" in k.__dict__ and issubclass(k, torch.optim.Optimizer)
                         and k is not torch.optim.Optimizer]
        elif field_name == "model_options":
            functions = [get_model_info(name).builder]
        else:
            functions = [get_dataset_info(name).loader]
    except (TypeError, ValueError):
        return frozenset()
    return _float_parameters(functions)
