"""Writes ``legacy_state_dicts.pt``: optimizer state dicts in the layout of sharpness before the DCP layout
(commit e174c8a: a top-level ``"sharpness"`` entry), with the weights each run reaches 4 steps later.

Run once with that version of the package on the path (``PYTHONPATH=<checkout of e174c8a>/src``) from the
``tests`` directory; ``test_dcp.py`` checks that today's optimizers resume those runs exactly.
"""

import copy
import sys

import torch

sys.path.insert(0, ".")
from test_dcp import build, mlp, train

LEGACY = ["looksam-k3", "ssamf-sparse", "salr-looksam", "tracesam", "entropysgd", "aesam"]

if __name__ == "__main__":
    out = {}
    for case in LEGACY:
        model = mlp(0)
        opt = build(case, model)
        train(opt, model, 5)
        # (deep copies: state_dict() hands out the live momentum buffers, which the next steps change)
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
        assert "sharpness" in saved["opt"], "run this with the earlier version of the package"
        train(opt, model, 4)
        saved["after"] = [p.detach().clone() for p in model.parameters()]
        out[case] = saved
    torch.save(out, "data/legacy_state_dicts.pt")
    print({case: sorted(out[case]["opt"]["sharpness"]) for case in out})
