"""Reports from the experiments store: mean ± std over seeds, paired differences against a baseline, figures.

``build_report(store, out_dir)`` groups the finished runs into *settings* (a run's config with the seed removed),
tabulates each setting's final metrics as mean ± sample std over its seeds, compares each setting with the
baseline setting of the same *context* (dataset, model and budget) seed by seed, draws the training curves, and
writes one Markdown (or HTML) page that links the PNG figures and records the environment the runs came from.

Statistics: ``std`` is the sample standard deviation (``ddof=1``); with one seed it is shown as ``—``. Values
that are missing or not finite (a diverged run) are left out of a cell and the cell says on how many runs it
rests. Paired differences are ``setting − baseline`` in percentage points of test accuracy over the seeds both
have; when ``group_by`` lumps several runs with one seed into a setting, those runs are averaged first.

Selection (``select``): each run is reported at its final record (``"final"``, the default), or at one epoch's
record, the same epoch for every cell and paired difference of that run: the epoch with the highest validation
accuracy (``"best-val"``, runs trained with ``validation > 0``) or the highest test accuracy (``"best-test"``,
selection on the test set: an optimistic estimate, reported as the GAM code does). Ties go to the earliest epoch;
a non-finite accuracy is never selected. The curves are the same under every selection.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_open, write_text_atomically
from .config import TrainConfig
from .store import RunRecord, Store

__all__ = ["CONTEXT_KEYS", "REPORT_FORMATS", "SELECTIONS", "RunGroup", "build_report", "group_runs"]

REPORT_FORMATS = ("markdown", "html")
# Which record a run is reported at: its final one, or the epoch with the best validation / test accuracy.
SELECTIONS = ("final", "best-val", "best-test")
_SELECTION_KEYS = {"best-val": "val_acc", "best-test": "test_acc"}
# The fields that decide whether two settings may be compared at all: same data, same network, same budget.
CONTEXT_KEYS = ("dataset", "model", "epochs", "budget_steps", "budget_grad_evals")
_ENV_KEYS = ("torch", "git_commit", "sharpness", "python", "device", "platform")


@dataclass(frozen=True)
class RunGroup:
    """One setting: the runs that share a config up to the seed (or up to ``group_by``)."""

    label: str
    key: tuple[tuple[str, Any], ...]  # the flattened config fields that define the setting
    context: tuple[tuple[str, Any], ...]  # CONTEXT_KEYS values shared by the runs
    runs: tuple[RunRecord, ...]

    @property
    def seeds(self) -> tuple[Any, ...]:
        return tuple(sorted({r.config.get("seed") for r in self.runs}, key=_sort_key))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.key)


# ------------------------------------------------------------------------------------------------- grouping
def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optimizer_options": {"rho": 0.05}}`` -> ``{"optimizer_options.rho": 0.05}`` (values made hashable):
    a run's config as settings are compared."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, Mapping):
            for sub, inner in flat_config(value).items():
                flat[f"{name}.{sub}"] = inner
        else:
            flat[name] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _sort_key(value: Any) -> tuple[int, Any]:
    # None, numbers and strings sort without comparing across types.
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value)
    return (2, str(value))


def _short_name(key: str) -> str:
    return key.removeprefix("optimizer_options.")


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(_format_value(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def group_runs(runs: Sequence[RunRecord], group_by: Sequence[str] | None = None) -> list[RunGroup]:
    """Group runs into settings, each with a short label unique within its context.

    Without ``group_by`` a setting is the whole config minus ``seed``. With ``group_by`` (config keys, dotted for
    options such as ``"optimizer_options.rho"``) a setting is those keys plus the context keys, so runs that differ
    in anything else are pooled. The label is the optimizer's name followed by the fields that differ between the
    settings of one context, e.g. ``sam(rho=0.05)``.
    """
    if group_by is not None:
        if isinstance(group_by, str) or not all(isinstance(k, str) for k in group_by):
            raise TypeError(f"Invalid group_by type: {group_by!r} (expected a sequence of config key names)")
        known = sorted({k for r in runs for k in flat_config(r.config)})
        unknown = [k for k in group_by if k not in known]
        if unknown:
            raise ValueError(f"Unknown group_by keys: {unknown} (expected some of {', '.join(known)})")
    # Fields a run's config lacks (it predates them) take TrainConfig's defaults, so old and new runs group.
    defaults = flat_config({f.name: f.default for f in dataclasses.fields(TrainConfig)
                         if f.default is not dataclasses.MISSING})
    buckets: dict[tuple[tuple[str, Any], ...], list[RunRecord]] = {}
    for run in runs:
        flat = {**defaults, **flat_config(run.config)}
        flat.pop("seed", None)
        if group_by is not None:
            wanted = set(group_by) | set(CONTEXT_KEYS)
            flat = {k: v for k, v in flat.items() if k in wanted}
        key = tuple(sorted(flat.items()))
        buckets.setdefault(key, []).append(run)

    by_context: dict[tuple[tuple[str, Any], ...], list[tuple[tuple[tuple[str, Any], ...], list[RunRecord]]]] = {}
    for key, members in buckets.items():
        settings = dict(key)
        context = tuple((k, settings.get(k)) for k in CONTEXT_KEYS)
        by_context.setdefault(context, []).append((key, members))

    groups: list[RunGroup] = []
    for context, entries in by_context.items():
        labels = _labels([dict(key) for key, _ in entries])
        for (key, members), label in zip(entries, labels):
            members.sort(key=lambda r: (_sort_key(r.config.get("seed")), r.finished_at))
            if group_by is None:
                members = _newest_per_seed(label, members)
            groups.append(RunGroup(label, key, context, tuple(members)))
    return groups


def _newest_per_seed(label: str, members: list[RunRecord]) -> list[RunRecord]:
    """One run per seed in a setting (without ``group_by``, a setting is the whole config but its seed): two runs
    of one seed are one configuration stored under two ids (e.g. ``rho = 1`` and ``1.0`` before the config read
    integers as floats, or a run from before a field existed); counting both would count one seed twice."""
    newest: dict[Any, RunRecord] = {}
    for run in members:  # sorted by (seed, finished_at): the last of a seed is its newest
        newest[_hashable(run.config.get("seed"))] = run
    if len(newest) < len(members):
        warnings.warn(f"{label}: {len(members) - len(newest)} run(s) repeat a seed of the same setting (stored "
                      "under another run id); the newest run of each seed is used", RuntimeWarning, stacklevel=3)
    return list(newest.values())


def differing_keys(settings: Sequence[Mapping[str, Any]], exclude: Iterable[str] = ()) -> list[str]:
    """The keys (sorted) whose values differ between these flattened settings, a missing key counting as a
    value, leaving out ``exclude``."""
    skip = set(exclude)
    keys = sorted({k for s in settings for k in s} - skip)
    return [k for k in keys if len({_hashable_repr(s.get(k, _MISSING)) for s in settings}) > 1]


def _labels(settings: list[dict[str, Any]]) -> list[str]:
    """Labels from the fields that differ between these settings (the optimizer's name always leads)."""
    varying = differing_keys(settings, ("optimizer", *CONTEXT_KEYS))
    # Options first (they are what a reader looks for), then any other field.
    varying.sort(key=lambda k: (not k.startswith("optimizer_options."), k))
    labels = []
    for s in settings:
        name = str(s.get("optimizer", "run"))
        parts = [f"{_short_name(k)}={_format_value(s[k])}" for k in varying if k in s]
        labels.append(f"{name}({', '.join(parts)})" if parts else name)
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
    return unique


_MISSING = object()


def _hashable_repr(value: Any) -> str:
    return "<missing>" if value is _MISSING else repr(value)


# ------------------------------------------------------------------------------------------------- statistics
def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append(float(v))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(values: Sequence[Any], n_runs: int, spec: str, scale: float = 1.0, offset: float = 0.0) -> str:
    """``mean ± std`` of ``offset + scale * v`` over the finite values (format ``spec``, e.g. ``".2f"``), with
    ``(n=k)`` when some were left out."""
    kept = [offset + scale * v for v in _finite(values)]
    if not kept:
        return "—"
    mean, std = _mean_std(kept)
    text = f"{mean:{spec}} ± {std:{spec}}" if std is not None else f"{mean:{spec}} ± —"
    if len(kept) < n_runs:
        text += f" (n={len(kept)})"
    return text


# (column title, summary key, format, scale, offset)
Metric = tuple[str, str, str, float, float]
_METRICS: tuple[Metric, ...] = (
    ("Test acc (%)", "test_acc", ".2f", 100.0, 0.0),
    ("Test error (%)", "test_acc", ".2f", -100.0, 100.0),
    ("Test loss", "test_loss", ".4f", 1.0, 0.0),
    ("Final train loss", "train_loss", ".4f", 1.0, 0.0),
    ("%SAM", "sam_fraction", ".1f", 100.0, 0.0),
    ("Grad evals", "grad_evals", ".0f", 1.0, 0.0),
    ("Steps", "steps", ".0f", 1.0, 0.0),
    ("Wall time (s)", "wall_time", ".1f", 1.0, 0.0),
)
_VALIDATION: Metric = ("Val acc (%)", "val_acc", ".2f", 100.0, 0.0)
_EPOCH: Metric = ("Epoch", "epoch", ".1f", 1.0, 0.0)  # the selected epoch (best-val / best-test only)
_SHARPNESS_PREFIX = "sharpness."


def _final(run: RunRecord, key: str) -> Any:
    """A run's final value of ``key``: its summary's; a sharpness measure of a run stored before the summary
    carried them comes from its last epoch (the last epoch is always measured)."""
    if key in run.summary:
        return run.summary[key]
    if key.startswith(_SHARPNESS_PREFIX) and run.epochs:
        return run.epochs[-1].get(key)
    return None


def _selected_epoch(run: RunRecord, select: str) -> Mapping[str, Any] | None:
    """The epoch record a best-epoch selection (``"best-val"``/``"best-test"``) reports ``run`` at: the earliest
    epoch with the highest finite validation / test accuracy; None when no epoch has a finite one."""
    key = _SELECTION_KEYS[select]
    best: tuple[float, Mapping[str, Any]] | None = None
    for record in run.epochs:
        acc = _finite([record.get(key)])
        if acc and (best is None or acc[0] > best[0]):  # strictly greater: a tie keeps the earlier epoch
            best = (acc[0], record)
    return None if best is None else best[1]


def _value(run: RunRecord, key: str, select: str) -> Any:
    """A run's value of ``key`` as the tables show it: its final value (``"final"``) or its selected epoch's
    (other selections). Every table cell and paired difference reads values here, so all of a run's numbers
    come from one record."""
    if select == "final":
        return _final(run, key)
    record = _selected_epoch(run, select)
    return None if record is None else record.get(key)


def _metrics(groups: Sequence[RunGroup], select: str = "final") -> list[Metric]:
    """The table's columns: the fixed ones, validation accuracy when some run has it (``--validation``), and
    each sharpness measure's final value when some run measured it (``--measure``). Under a best-epoch selection
    the selected epoch (mean over runs) comes first and no title says "Final"."""
    runs = [r for g in groups for r in g.runs]
    metrics = list(_METRICS)
    if any(_finite([_value(r, "val_acc", select)]) for r in runs):
        metrics.insert(2, _VALIDATION)
    measured = {k for r in runs for k in (*r.summary, *(r.epochs[-1] if r.epochs else ()))
                if k.startswith(_SHARPNESS_PREFIX)}
    metrics += [(f"Final {key.removeprefix(_SHARPNESS_PREFIX)}", key, ".4g", 1.0, 0.0) for key in sorted(measured)]
    if select != "final":
        metrics = [_EPOCH] + [("Train loss" if title == "Final train loss" else title.removeprefix("Final "), *rest)
                              for title, *rest in metrics]
    return metrics


def _per_seed_acc(group: RunGroup, select: str = "final") -> dict[Any, float]:
    """Test accuracy (%) per seed at the ``select``ed record; several runs with one seed (pooled by
    ``group_by``) are averaged."""
    values: dict[Any, list[float]] = {}
    for run in group.runs:
        acc = _finite([_value(run, "test_acc", select)])
        if acc:
            values.setdefault(run.config.get("seed"), []).append(100.0 * acc[0])
    return {seed: statistics.fmean(v) for seed, v in values.items()}


def _baseline_choices(groups: Sequence[RunGroup]) -> list[str]:
    return sorted({g.label for g in groups} | {str(g.settings.get("optimizer")) for g in groups})


def _find_baselines(groups: Sequence[RunGroup], baseline: str) -> list[RunGroup]:
    exact = [g for g in groups if g.label == baseline]
    return exact or [g for g in groups if g.settings.get("optimizer") == baseline]


def _nearest_baselines(group: RunGroup, bases: Sequence[RunGroup]) -> list[RunGroup]:
    """The baseline settings ``group`` is paired with: those other than itself whose settings differ from its
    own in the fewest config fields (all of them at equal distance). With one baseline setting in a context
    every other setting pairs with it; with several (ERM on SGD and on Adam, ERM and SWA, which is ERM too),
    each pairs with its own kind."""
    others = [b for b in bases if b is not group]
    if not others:
        return []
    distance = {id(b): sum(group.settings.get(k, _MISSING) != b.settings.get(k, _MISSING)
                           for k in group.settings.keys() | b.settings.keys()) for b in others}
    nearest = min(distance.values())
    return [b for b in others if distance[id(b)] == nearest]


def _seed_list(seeds: Sequence[Any]) -> str:
    return ", ".join(str(s) for s in sorted(seeds, key=_sort_key))


# ------------------------------------------------------------------------------------------------- page model
# A page is a list of blocks rendered to Markdown or HTML: ("h", level, text), ("p", text),
# ("table", headers, rows), ("img", file name, caption), ("list", items).
Block = tuple[Any, ...]


def _context_title(context: tuple[tuple[str, Any], ...]) -> str:
    c = dict(context)
    budget = ("?" if all(c.get(k) is None for k in ("epochs", "budget_steps", "budget_grad_evals")) else
              f"{c['budget_grad_evals']} gradient evaluations" if c.get("budget_grad_evals") is not None else
              f"{c['budget_steps']} steps" if c.get("budget_steps") is not None else f"{c['epochs']} epochs")
    return f"{c.get('dataset', '?')} / {c.get('model', '?')} / {budget}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "runs"


def _results_table(groups: Sequence[RunGroup], select: str = "final") -> Block:
    metrics = _metrics(groups, select)
    headers = ["Setting", "n", "Seeds"] + [title for title, *_ in metrics]
    rows = []
    for g in groups:
        n = len(g.runs)
        row = [g.label, str(n), _seed_list(g.seeds)]
        for _, key, spec, scale, offset in metrics:
            row.append(_cell([_value(r, key, select) for r in g.runs], n, spec, scale, offset))
        rows.append(row)
    return ("table", headers, rows)


def _paired_blocks(groups: Sequence[RunGroup], baseline: str, select: str = "final") -> list[Block]:
    bases = _find_baselines(groups, baseline)
    if not bases:
        labels = ", ".join(g.label for g in groups)
        return [("p", (f"**Note:** no baseline setting `{baseline}` in this context (settings: {labels}); "
                      "paired comparisons are skipped. Pass `baseline=` one of these labels or optimizer names."))]
    headers = ["Setting", "Baseline", "Δ acc (pp), mean ± std", "Pairs", "Wins", "Seeds missing"]
    rows = []
    paired: set[frozenset[int]] = set()
    for g in groups:
        for base in _nearest_baselines(g, bases):
            if frozenset((id(g), id(base))) in paired:  # two baselines nearest each other: one row
                continue
            paired.add(frozenset((id(g), id(base))))
            base_acc = _per_seed_acc(base, select)
            acc = _per_seed_acc(g, select)
            common = sorted(set(acc) & set(base_acc), key=_sort_key)
            diffs = [acc[s] - base_acc[s] for s in common]
            if diffs:
                mean, std = _mean_std(diffs)
                delta = f"{mean:+.2f} ± {std:.2f}" if std is not None else f"{mean:+.2f} ± —"
            else:
                delta = "—"
            wins = f"{sum(d > 0 for d in diffs)}/{len(diffs)}" if diffs else "—"
            missing = []
            only_base = sorted(set(base_acc) - set(acc), key=_sort_key)
            only_here = sorted(set(acc) - set(base_acc), key=_sort_key)
            if only_base:
                missing.append(f"{_seed_list(only_base)} (from {g.label})")
            if only_here:
                missing.append(f"{_seed_list(only_here)} (from {base.label})")
            rows.append([g.label, base.label, delta, str(len(diffs)), wins, "; ".join(missing) or "none"])
    blocks: list[Block] = [("table", headers, rows)]
    if len(bases) > 1:
        blocks.append(("p", (f"{len(bases)} settings match the baseline `{baseline}` here: each setting is paired "
                             "with the one(s) nearest to it (fewest differing config fields), so a method on Adam "
                             "is compared with Adam, not with SGD.")))
    if not rows:
        blocks = [("p", f"Only the baseline `{baseline}` ran in this context; nothing to compare.")]
    return blocks


def _environment_blocks(runs: Sequence[RunRecord]) -> list[Block]:
    rows = []
    for key in _ENV_KEYS:
        counts: dict[str, int] = {}
        for r in runs:
            value = r.environment.get(key)
            text = "unrecorded" if value is None else str(value)
            counts[text] = counts.get(text, 0) + 1
        if set(counts) == {"unrecorded"}:
            continue
        cell = "; ".join(f"{v} ({n} run{'s' if n != 1 else ''})" if len(counts) > 1 else v
                         for v, n in sorted(counts.items(), key=lambda item: -item[1]))
        rows.append([key, cell])
    blocks: list[Block] = [("h", 2, "Environment")]
    if not rows:
        return blocks + [("p", "No environment was recorded with these runs.")]
    blocks.append(("table", ["Field", "Value"], rows))
    commits = {r.environment.get("git_commit") for r in runs}
    if len(commits) > 1:
        blocks.append(("p", f"**Note:** the runs come from {len(commits)} different code versions (git_commit)."))
    return blocks


# ------------------------------------------------------------------------------------------------- figures
def _curves(group: RunGroup, x_key: str, y_fn: Any) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over seeds of ``y_fn(epoch record, previous record)`` at each epoch index.

    Runs of one setting are aligned by epoch index; the x value is the mean of ``x_key`` over the runs that
    have that epoch (``grad_evals`` differs slightly between seeds for adaptive policies).
    """
    length = max((len(r.epochs) for r in group.runs), default=0)
    xs, mean, low, high = [], [], [], []
    for i in range(length):
        x_vals, y_vals = [], []
        for r in group.runs:
            if i >= len(r.epochs):
                continue
            record = r.epochs[i]
            previous = r.epochs[i - 1] if i > 0 else None
            x = _finite([record.get(x_key)])
            y = _finite([y_fn(record, previous)])
            if x and y:
                x_vals.append(x[0])
                y_vals.append(y[0])
        if y_vals:
            xs.append(statistics.fmean(x_vals))
            mean.append(statistics.fmean(y_vals))
            low.append(min(y_vals))
            high.append(max(y_vals))
    return xs, mean, low, high


def _test_error(record: Mapping[str, Any], _previous: Any) -> Any:
    acc = record.get("test_acc")
    return None if not _finite([acc]) else 100.0 * (1.0 - acc)


def _sam_percent(record: Mapping[str, Any], previous: Mapping[str, Any] | None) -> Any:
    """%SAM over this epoch's steps (from the cumulative counters), else the recorded cumulative fraction."""
    steps, sam = _finite([record.get("steps")]), _finite([record.get("sam_steps")])
    if steps and sam:
        prev_steps = _finite([previous.get("steps")]) if previous else [0.0]
        prev_sam = _finite([previous.get("sam_steps")]) if previous else [0.0]
        if prev_steps and prev_sam and steps[0] > prev_steps[0]:
            return 100.0 * (sam[0] - prev_sam[0]) / (steps[0] - prev_steps[0])
    frac = record.get("sam_fraction")
    return None if not _finite([frac]) else 100.0 * frac


def _key_getter(key: str) -> Any:
    return lambda record, _previous: record.get(key)


def _write_figure(path: Path, groups: Sequence[RunGroup], x_key: str, y_fn: Any, x_label: str, y_label: str,
                  title: str, *, log_y: bool = False) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for g in groups:
        xs, mean, low, high = _curves(g, x_key, y_fn)
        if not xs:
            continue
        (line,) = ax.plot(xs, mean, label=f"{g.label} (n={len(g.runs)})", linewidth=1.5)
        if len(g.runs) > 1:
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        return False
    if log_y and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return True


def _figure_blocks(groups: Sequence[RunGroup], out_dir: Path, prefix: str) -> list[Block]:
    band = "line: mean over seeds; band: min–max over seeds"
    specs = [
        ("test_error_vs_epoch", "epoch", _test_error, "epoch", "test error (%)", "Test error vs epochs", False),
        ("test_error_vs_grad_evals", "grad_evals", _test_error, "gradient evaluations", "test error (%)",
         "Test error vs gradient evaluations", False),
        ("lr_vs_grad_evals", "grad_evals", _key_getter("lr"), "gradient evaluations", "learning rate",
         "Learning rate vs gradient evaluations", False),
        ("sam_percent_vs_grad_evals", "grad_evals", _sam_percent, "gradient evaluations",
         "%SAM steps in the epoch", "%SAM vs gradient evaluations", False),
    ]
    sharp_keys = sorted({k for g in groups for r in g.runs for e in r.epochs for k in e
                         if k.startswith("sharpness.")})
    for key in sharp_keys:
        specs.append((f"{_slug(key)}_vs_grad_evals", "grad_evals", _key_getter(key), "gradient evaluations",
                      key, f"{key} vs gradient evaluations", True))
    blocks: list[Block] = []
    for name, x_key, y_fn, x_label, y_label, title, log_y in specs:
        path = out_dir / f"{prefix}{name}.png"
        if _write_figure(path, groups, x_key, y_fn, x_label, y_label, title, log_y=log_y):
            blocks.append(("img", path.name, f"{title} ({band})"))
    if not sharp_keys:
        blocks.append(("p", "No sharpness curves: the epoch records carry no `sharpness.*` keys."))
    return blocks


# ------------------------------------------------------------------------------------------------- rendering
def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _render_markdown(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(_md_escape(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _inline_html(text: str) -> str:
    # The few Markdown marks the page model uses: **bold** and `code`.
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _render_html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{_inline_html(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            src, caption = html.escape(block[1]), html.escape(block[2])
            body.append(f'<figure><img src="{src}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")




# ------------------------------------------------------------------------------------------------- selection
_SELECTION_NOTES = {
    "best-val": ("Selected per run: the epoch with the highest validation accuracy (ties: the earliest). Every "
                 "cell and the paired differences come from that epoch's record; Epoch is the mean selected epoch."),
    "best-test": ("Selected per run: the epoch with the highest test accuracy (selection on the test set: an "
                  "optimistic estimate, as in the GAM code; ties: the earliest). Every cell and the paired "
                  "differences come from that epoch's record; Epoch is the mean selected epoch."),
}


def _check_selectable(runs: Sequence[RunRecord], select: str, source: str) -> None:
    """A best-epoch selection needs every reported run to carry the accuracy it selects on in its epoch records;
    a run without them would silently drop out of every cell, so it is an error that says what to do."""
    key = _SELECTION_KEYS[select]
    lacking = [r for r in runs if not any(key in record for record in r.epochs)]
    if not lacking:
        return
    what = "validation accuracy (val_acc)" if select == "best-val" else "test accuracy (test_acc)"
    remedy = ("train with validation > 0 (--validation 0.1) or use select='final' or 'best-test'"
              if select == "best-val" else "use select='final'")
    raise ValueError(f"Cannot select {select}: {len(lacking)} of the {len(runs)} runs in {source} have no "
                     f"per-epoch {what} (e.g. run {lacking[0].run_key}); {remedy}")


# ------------------------------------------------------------------------------------------------- entry point
def build_report(store: Store | str | os.PathLike[str], out_dir: str | os.PathLike[str], *, baseline: str = "erm",
                 group_by: Sequence[str] | None = None, fmt: str = "markdown", figures: bool = True,
                 require_baseline: bool = False, select: str = "final") -> Path:
    """Write a comparison report of the runs in ``store`` to ``out_dir``; returns the page's path.

    Args:
        store: a :class:`Store` or the path of an existing store file (never created here).
        out_dir: folder for ``report.md`` / ``report.html`` and the PNG figures (created if missing).
        baseline: the setting each other setting is compared with, seed by seed, within its context
            (same dataset, model and budget): a setting label (``"sam(rho=0.05)"``) or an optimizer name.
        group_by: config keys that define a setting (default: the whole config minus ``seed``).
        fmt: ``"markdown"`` or ``"html"``.
        figures: draw the training-curve figures (needs matplotlib).
        require_baseline: a ``baseline`` that matches no setting is an error (a misspelled name), not a note
            on the page (the default, for the default ``"erm"`` in a store without ERM runs).
        select: the record each run is reported at in the tables and paired differences: ``"final"`` (its
            final record), ``"best-val"`` (the epoch with the highest validation accuracy; every run must have
            been trained with ``validation > 0``) or ``"best-test"`` (the epoch with the highest test accuracy:
            selection on the test set, an optimistic estimate, as the GAM code reports). Ties go to the earliest
            epoch. Under a best-epoch selection the table adds an ``Epoch`` column (mean selected epoch) and a
            line under it says how the epoch was selected; a measure not taken at the selected epoch
            (``measure_every > 1``) is left out of its cell. The curves do not change.

    Example::

        page = build_report("results.sqlite", "report/", baseline="erm")
    """
    if not isinstance(fmt, str) or fmt not in REPORT_FORMATS:
        raise ValueError(f"Invalid fmt value: {fmt!r} (expected one of {', '.join(REPORT_FORMATS)})")
    if not isinstance(select, str) or select not in SELECTIONS:
        raise ValueError(f"Invalid select value: {select!r} (expected one of {', '.join(SELECTIONS)})")
    if not isinstance(baseline, str) or not baseline:
        raise TypeError(f"Invalid baseline type: {baseline!r} (expected a setting label or optimizer name)")
    if isinstance(store, Store):
        runs = store.runs()
        source = store.path
    elif isinstance(store, (str, os.PathLike)):
        if not Path(store).is_file():
            raise FileNotFoundError(f"No results store at {store} (expected a file written by a sweep)")
        with Store(store) as opened:
            runs = opened.runs()
        source = str(store)
    else:
        raise TypeError(f"Invalid store type: {type(store).__name__} (expected a Store or a path)")
    if not runs:
        raise ValueError(f"The store {source} holds no finished runs; nothing to report (run a sweep first)")

    groups = group_runs(runs, group_by)
    if require_baseline and not _find_baselines(groups, baseline):
        raise ValueError(f"Unknown baseline {baseline!r}: no setting label or optimizer name in {source} matches "
                         f"(expected one of {', '.join(_baseline_choices(groups))})")
    if select != "final":
        _check_selectable([r for g in groups for r in g.runs], select, source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contexts: dict[tuple[tuple[str, Any], ...], list[RunGroup]] = {}
    for g in groups:
        contexts.setdefault(g.context, []).append(g)

    title = "Sharpness comparison report"
    blocks: list[Block] = [
        ("h", 1, title),
        ("p", (f"Store `{source}`: {len(runs)} runs in {len(groups)} settings and {len(contexts)} context(s). "
              "Cells are mean ± sample std over seeds (n runs); Δ acc is the paired difference "
              f"(setting − baseline `{baseline}`) in percentage points over the seeds both ran.")),
    ]
    if not _find_baselines(groups, baseline):
        blocks.append(("p", (f"**Note:** baseline `{baseline}` is absent from the store; no paired comparisons. "
                            f"Available: {', '.join(_baseline_choices(groups))}.")))
    for context, members in contexts.items():
        heading = _context_title(context)
        blocks.append(("h", 2, heading))
        shared = {k: v for k, v in members[0].settings.items()
                  if k not in CONTEXT_KEYS and all(m.settings.get(k, _MISSING) == v for m in members)}
        if shared:
            blocks.append(("p", "Shared settings: " + ", ".join(f"{k}={_format_value(v)}"
                                                                 for k, v in sorted(shared.items()))))
        if select == "final":
            blocks += [("h", 3, "Final metrics"), _results_table(members)]
        else:
            blocks += [("h", 3, "Metrics at the selected epoch"), _results_table(members, select),
                       ("p", _SELECTION_NOTES[select])]
        blocks += [("h", 3, f"Paired against `{baseline}`")] + _paired_blocks(members, baseline, select)
        if figures:
            prefix = "" if len(contexts) == 1 else _slug(heading) + "_"
            blocks += [("h", 3, "Curves")] + _figure_blocks(members, out, prefix)
    blocks += _environment_blocks(runs)

    if fmt == "markdown":
        page, text = out / "report.md", _render_markdown(blocks)
    else:
        page, text = out / "report.html", _render_html(blocks, title)
    write_text_atomically(page, text)
    return page
