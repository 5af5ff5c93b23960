"""README.md keeps its promises: its python blocks run, its tables and flags name what exists.

The blocks are read from README.md when the tests run (never copied here), so an edit that breaks a snippet
breaks a test. README snippets use the reader's own ``model``, ``x, y``, ``loss_fn``, ``loader``, ``T`` and
``opt``; ``_context`` supplies the smallest such objects (a 10-16-3 MLP, one batch of 32). A snippet that needs
anything else fails with the name it lacks.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer

import sharpness
from helpers import registered_names
from sharpness.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"

#: the names README snippets take from the reader's program, and what they stand for here
CONTEXT_NAMES = ("torch", "sharpness", "F", "model", "x", "y", "loss_fn", "loader", "T", "opt")

#: snippets that cannot run here, by a phrase they contain, with the reason (none at present)
SKIP: dict[str, str] = {
    "download=True": "fetches a data set (no network in the tests)",
    ".cuda(": "needs a GPU",
}


def _fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced block in ``language``, also those indented inside list items."""
    blocks, lines, start, fence, body = [], text.splitlines(), None, "", []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if start is None and stripped.startswith("```"):
            start, fence, body = number, stripped[3:].strip(), []
        elif start is not None and stripped == "```":
            if fence == language:
                blocks.append((start + 1, textwrap.dedent("\n".join(body))))
            start = None
        elif start is not None:
            body.append(line)
    return blocks


README_TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = _fenced_blocks(README_TEXT, "python")


def _block(phrase: str) -> str:
    matches = [code for _, code in PYTHON_BLOCKS if phrase in code]
    assert len(matches) == 1, f"expected one README python block containing {phrase!r}, found {len(matches)}"
    return matches[0]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _context(opt_name: str = "sam", **options) -> dict:
    """A fresh namespace holding the reader's objects; ``opt`` is ``opt_name`` on SGD with momentum."""
    model = _model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
    info = sharpness.get_optimizer_info(opt_name)
    if "total_steps" in info.required:
        options.setdefault("total_steps", 10)
    opt = sharpness.create(opt_name, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **options)
    loader = [(x[:16], y[:16]), (x[16:], y[16:])]
    namespace = {"torch": torch, "sharpness": sharpness, "F": F, "model": model, "x": x, "y": y,
                 "loss_fn": F.cross_entropy, "loader": loader, "T": 10, "opt": opt}
    assert tuple(namespace) == CONTEXT_NAMES
    return namespace


def _run(code: str, namespace: dict, where: str) -> dict:
    try:
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - running the README's own code is the test
    except NameError as error:
        pytest.fail(f"{where}: {error}; define it in the snippet or add it to CONTEXT_NAMES in this test")
    return namespace


def test_readme_has_the_python_blocks_this_file_runs():
    assert len(PYTHON_BLOCKS) >= 5, PYTHON_BLOCKS


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a snippet writes (a checkpoint) stays out of the checkout
    for phrase, reason in SKIP.items():
        if phrase in code:
            pytest.skip(f"README.md:{line}: {reason}")
    ns = _run(code, _context(), f"README.md:{line}")
    opt = ns["opt"]
    if callable(ns.get("closure")) and ".step(" not in code:  # a closure the snippet defines but leaves to the loop
        opt.step(ns["closure"])
    params = [p for group in opt.param_groups for p in group["params"]]
    assert all(torch.isfinite(p).all() for p in params)
    if "opt.step(" in code or "first_step(" in code or "closure" in ns:
        assert opt.steps >= 1 and opt.grad_evals >= 1


def test_readme_quick_start_counts_its_passes():
    """AE-SAM's first step is a SAM step (its statistics are still warming up): 2 passes, sam_fraction 1."""
    ns = _run(_block("sharpness.AESAM("), _context(), "README.md quick start")
    assert (ns["opt"].steps, ns["opt"].grad_evals, ns["opt"].sam_fraction) == (1, 2, 1.0)
    assert torch.is_tensor(ns["loss"]) and ns["loss"].ndim == 0


@pytest.mark.parametrize("name", registered_names())
def test_readme_make_closure_block_serves_every_method(name):
    """'Closures by flag': ``make_closure`` builds the closure each registered method (default options) needs."""
    ns = _run(_block("make_closure("), _context(name), f"README.md make_closure block ({name})")
    assert ns["opt"].steps == 1 and ns["opt"].grad_evals >= 1
    assert torch.isfinite(ns["loss"]).all()


@pytest.mark.parametrize("name", registered_names())
def test_readme_micro_batch_closure_serves_every_method_in_its_standard_closure_options(name):
    """The gradient-accumulation closure, run on each method with its ``standard_closure_options``.

    With default options ESAM, SSAM-F and GNR refuse a hand-written closure (they need per-sample losses or a
    graph), so the README's 'works for every method' holds only in these options (README, 'Closures by flag').
    """
    options = dict(getattr(sharpness.get_optimizer_info(name).cls, "standard_closure_options", {}))
    ns = _run(_block("chunk(4)"), _context(name, **options), f"README.md micro-batch closure ({name})")
    for _ in range(2):
        ns["opt"].step(ns["closure"])
    assert ns["opt"].steps == 2


def test_readme_two_phase_block_on_a_method_that_skips():
    """The two-phase loop with AE-SAM, whose ``first_step`` may answer False (no perturbed pass)."""
    ns = _context("aesam")
    for _ in range(3):
        _run(_block("first_step("), ns, "README.md two-phase block")
    assert ns["opt"].steps == 3 and 3 <= ns["opt"].grad_evals <= 6


def test_readme_optimizer_table_is_the_registry():
    rows = [line.split("|")[1:3] for line in README_TEXT.splitlines() if line.startswith("| `")]
    names = {n for first, _ in rows for n in re.findall(r"`(\w+)`", first)}
    classes = {c for _, second in rows for c in re.findall(r"`(\w+)`", second)}
    assert names == set(registered_names())
    for info in sharpness.list_optimizers():
        assert info.cls.__name__ in classes, info.name
    assert all(hasattr(sharpness, c) for c in classes), classes - set(dir(sharpness))


def test_readme_counters_exist_on_every_method():
    counters_line = next(line for line in README_TEXT.splitlines() if "**Counters.**" in line)
    counters = re.findall(r"`(\w+)`", counters_line)
    assert "grad_evals" in counters
    for name in registered_names():
        opt = _context(name)["opt"]
        missing = [c for c in counters if not hasattr(opt, c)]
        assert not missing, (name, missing)


def _cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    return {name: {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
            for name, command in group.commands.items()}


DOCUMENTS = [README, *sorted((README.parent / "docs").glob("*.md"))]


def _command_lines(path: Path) -> list[tuple[str, str]]:
    """``(where, line)`` of every ``sharpness``/``torchrun`` command: lines of bash blocks and inline code spans."""
    text = path.read_text(encoding="utf-8")
    found = []
    for line_no, code in _fenced_blocks(text, "bash"):
        found += [(f"{path.name}:{line_no + offset}", line) for offset, line in enumerate(code.splitlines())]
    for line_no, line in enumerate(text.splitlines(), 1):
        found += [(f"{path.name}:{line_no}", span) for span in re.findall(r"`((?:sharpness|torchrun) [^`]+)`", line)]
    return found


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_documented_command_lines_use_existing_commands_and_flags(path):
    options = _cli_options()
    for where, line in _command_lines(path):
        words = line.split("#")[0].replace("...", " ").split()
        if "sharpness" not in words or words[0] not in ("sharpness", "torchrun"):
            continue
        words = words[words.index("sharpness") + 1:]
        assert words and words[0] in options, f"{where}: unknown command {words[:1]}"
        for flag in (w.split("=")[0] for w in words[1:] if w.startswith("--")):
            assert flag in options[words[0]], f"{where}: sharpness {words[0]} has no option {flag}"


def test_readme_command_lines_are_found():
    assert len([1 for _, line in _command_lines(README) if line.split()[:1] in (["sharpness"], ["torchrun"])]) >= 8


def test_readme_inline_flags_exist():
    """Flags quoted in the prose (``--subset-strategy first`` ...) are options of some sharpness command."""
    known = set().union(*_cli_options().values())
    spans = re.findall(r"`(--[\w-][^`]*)`", README_TEXT)
    quoted = {flag for span in spans for flag in re.findall(r"(?<!\S)(--[\w-]+)", span)}
    assert quoted, "no inline flags found"
    assert quoted <= known, sorted(quoted - known)
