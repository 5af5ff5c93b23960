"""The wrappers' ``state_dict`` layout: one that ``torch.distributed.checkpoint`` (DCP) keeps whole.

DCP's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (``torch.distributed.checkpoint.state_dict``,
the way FSDP2 and torchtitan-style loops checkpoint) keep only an optimizer state dict's ``"state"``, re-keyed
by parameter name, and its ``"param_groups"``; any other top-level entry is dropped without a word. So the
public layout keeps the wrapper's own state inside those two:

* ``state[i]["sharpness_<key>"]``: the wrapper's per-parameter tensors (LookSAM's stored direction, SSAM-F's
  mask and Fisher sum), beside the base optimizer's (``momentum_buffer``, ``exp_avg``, ...), so DCP reshards,
  gathers and names them as it does the base's;
* ``param_groups[0]["sharpness"]``: the rest (counters, the policy's and the random streams' state, ...).

Internally the optimizers build and read the *native* layout: the base's state dict plus a top-level
``"sharpness"`` entry whose ``"param_state"`` maps parameter indices to those tensors. That is also the layout
this package wrote before (its checkpoints still load: :func:`unpack` passes it through). :func:`pack` and
:func:`unpack` convert at the public ``state_dict`` / ``load_state_dict`` (``_state.SharesBaseParamGroups``).

DCP also builds the state of a fresh optimizer before loading into it, by a ``step()`` without a closure at
learning rate 0 over zero gradients; :func:`is_state_initialization` recognises that call.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from .._foreach import local

__all__: list[str] = []

#: the wrapper's entry (native: top level; public: in the first param group) and its per-parameter key prefix
ENTRY = "sharpness"
PREFIX = "sharpness_"
PARAM_STATE = "param_state"


def pack(native: dict[str, Any]) -> dict[str, Any]:
    """The public layout of a native state dict (a dict without a ``"sharpness"`` entry is returned as is)."""
    if ENTRY not in native:
        return native
    packed = dict(native)
    extra = dict(packed.pop(ENTRY))
    param_state = extra.pop(PARAM_STATE, None)
    groups = [dict(group) for group in packed["param_groups"]]
    if not groups:
        raise ValueError("Cannot save the optimizer's state: it has no param groups")
    if param_state is not None:
        extra[PARAM_STATE] = {}  # its tensors go to the parameters' own entries
        state = {index: dict(entries) for index, entries in packed["state"].items()}
        for index, entries in param_state.items():
            target = state.setdefault(index, {})
            for key, value in entries.items():
                target[PREFIX + key] = value
        packed["state"] = state
    groups[0][ENTRY] = extra
    packed["param_groups"] = groups
    return packed


def unpack(state_dict: Any) -> Any:
    """The native layout of a public state dict (anything else, a native dict included, is returned as is).

    The state may be keyed by parameter index (``Optimizer.state_dict``) or by parameter name (DCP): either
    way a key's position among the saved groups' ``"params"`` is the parameter's index, as torch's
    ``Optimizer.load_state_dict`` maps them.
    """
    if not isinstance(state_dict, dict) or ENTRY in state_dict:
        return state_dict
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not groups or not isinstance(groups[0], dict) or ENTRY not in groups[0]:
        return state_dict
    groups = [dict(group) for group in groups]
    extra = dict(groups[0].pop(ENTRY))
    position = {key: index for index, key in enumerate(chain.from_iterable(g.get("params", ()) for g in groups))}
    state: dict[Any, Any] = {}
    param_state: dict[int, dict[str, Any]] = {}
    for key, entries in state_dict.get("state", {}).items():
        ours, base = {}, {}
        for k, v in entries.items():
            if isinstance(k, str) and k.startswith(PREFIX):
                ours[k[len(PREFIX):]] = v
            else:
                base[k] = v
        if ours:
            if key not in position:
                raise ValueError(f"Invalid state_dict: state entry {key!r} belongs to no parameter of its "
                                 "param_groups")
            param_state[position[key]] = ours
        if base or not ours:
            state[key] = base
    if PARAM_STATE in extra or param_state:
        extra[PARAM_STATE] = param_state
    return {**{k: v for k, v in state_dict.items() if k not in ("state", "param_groups")},
            "state": state, "param_groups": groups, ENTRY: extra}


def is_state_initialization(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``step()`` without a closure is DCP's state initialization (``_init_optim_state``): every
    learning rate is 0 and every trainable parameter holds an all-zero gradient. Such a step changes no weight;
    it only makes the base optimizer allocate its state, so that a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if lr is None or float(lr) != 0.0:
            return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if not grads or any(g is None for g in grads):
        return False
    return not any(bool(g.any()) for g in local(grads))
