import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

# One data folder for the whole session (and the subprocesses the tests start): caches such as MNIST-1D's
# generated set are written there once, not into ~/.cache. A folder the developer chose is kept.
if not os.environ.get("SHARPNESS_DATA"):
    _data = tempfile.mkdtemp(prefix="sharpness-test-data-")
    os.environ["SHARPNESS_DATA"] = _data
    atexit.register(shutil.rmtree, _data, ignore_errors=True)
