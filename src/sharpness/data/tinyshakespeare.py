"""Tiny Shakespeare (Karpathy's char-rnn corpus, about 1.1M characters) for next-character prediction.

The text is read from a file (``root`` may be the file itself or a folder holding ``tinyshakespeare.txt``);
``download=True`` fetches it into that folder. The first 90% of the characters train, the last 10% test
(nanoGPT's split); an optional validation split is the end of the training part. The vocabulary is the
sorted set of characters of the whole text; token ``i`` is character ``classes[i]``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_open
from .._validation import check_int_at_least, check_real
from .paths import missing_data_error
from .record import SourceSplits
from .resident import ResidentSet

__all__ = ["FILENAME", "TRAIN_FRACTION", "URL", "CharWindows", "encode_text"]

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FILENAME = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9


class CharWindows(ResidentSet):
    """Windows of ``T = block_size`` tokens every ``stride`` characters: item ``i`` is
    ``(tokens[s:s+T], tokens[s+1:s+T+1])`` with ``s = i * stride``.

    The target is the input shifted by one character, so a model's logits at position ``t`` predict
    character ``t + 1``. With ``stride=1`` (training) there are ``len(tokens) - block_size`` overlapping windows;
    ``stride=block_size`` scores each character once (an evaluation ``block_size`` times cheaper).
    """

    def __init__(self, tokens: Tensor, block_size: int, stride: int = 1) -> None:
        if len(tokens) <= block_size:
            raise ValueError(f"Invalid block_size value: {block_size} (expected block_size < {len(tokens)}, "
                             "the number of characters in the split)")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = check_int_at_least("stride", stride, 1)

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size + self.stride - 1) // self.stride

    def _anchor(self) -> Tensor:
        return self.tokens

    def _moved(self, device: torch.device) -> CharWindows:
        return CharWindows(self.tokens.to(device), self.block_size, self.stride)

    def batch(self, index: Tensor, draws: object = None) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of windows number ``index`` (a tensor on the tokens' device): one gather."""
        start = index[:, None] * self.stride if self.stride != 1 else index[:, None]
        window = self.tokens[start + torch.arange(self.block_size + 1, device=self.device)]
        return window[:, :-1], window[:, 1:]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window index {index} out of range for {len(self)} windows")
        start = (index % len(self)) * self.stride
        window = self.tokens[start:start + self.block_size + 1]
        return window[:-1], window[1:]


def encode_text(text: str) -> tuple[Tensor, tuple[str, ...]]:
    """``(tokens, vocabulary)``: the sorted distinct characters and each character's index among them."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocabulary = np.unique(codes)
    tokens = torch.as_tensor(np.searchsorted(vocabulary, codes).astype(np.int64))
    return tokens, tuple(chr(code) for code in vocabulary)


def _download(destination: Path) -> None:
    """Fetch ``URL`` to ``destination`` (written to a temporary file first, so no partial file is left)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with urlopen(URL, timeout=60) as response:
        payload = response.read()
    with atomic_open(destination, "wb") as file:
        file.write(payload)


def text_path(root: Path, download: bool) -> Path:
    """The text file: ``root`` itself if it is a file, else ``root / FILENAME`` (fetched if ``download``)."""
    if root.is_file():
        return root
    path = root / FILENAME
    if not path.is_file():
        if not download:
            raise missing_data_error("Tiny Shakespeare", path,
                                     detail=f"or pass the text file itself as root; source: {URL}")
        _download(path)
    return path


def load(*, root: Path, download: bool, block_size: int = 128, validation: float = 0.0,
         eval_stride: int = 1) -> SourceSplits:
    """Registry loader: windows of ``block_size`` characters; ``validation``: a fraction of the training text.

    Args:
        block_size: characters per example (the model's context length), >= 1.
        validation: fraction ``0 <= validation < 1`` of the training characters, taken from its end, held
            out as a contiguous validation text (windows never straddle two splits).
        eval_stride: characters between the starts of the test and validation windows (>= 1). The default 1
            scores every overlapping window (each character up to ``block_size`` times: about 111k windows, 12
            minutes per evaluation on 2 CPU cores at ``block_size=128``); ``eval_stride=block_size`` scores
            each character once.
    """
    block_size = check_int_at_least("block_size", block_size, 1)
    eval_stride = check_int_at_least("eval_stride", eval_stride, 1)
    validation = check_real("validation", validation)
    if not (0.0 <= validation < 1.0):
        raise ValueError(f"Invalid validation value: {validation} (expected 0 <= validation < 1)")
    path = text_path(root, download)
    raw = path.read_bytes()
    tokens, vocabulary = encode_text(raw.decode("utf-8"))
    train_end = int(TRAIN_FRACTION * len(tokens))
    validation_start = train_end - int(validation * train_end)
    if validation > 0 and train_end - validation_start <= block_size:
        raise ValueError(f"Invalid validation value: {validation} (holds out {train_end - validation_start} "
                         f"characters of {train_end}; expected more than block_size = {block_size}, one window)")
    train = CharWindows(tokens[:validation_start], block_size)
    held_out = None
    if validation_start < train_end:
        held_out = CharWindows(tokens[validation_start:train_end], block_size, eval_stride)
    settings = {
        "path": str(path.resolve()),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "block_size": block_size,
        "eval_stride": eval_stride,
        "vocab_size": len(vocabulary),
        "train_fraction": TRAIN_FRACTION,
        "train_characters": validation_start,
        "validation_characters": train_end - validation_start,
        "test_characters": len(tokens) - train_end,
    }
    return SourceSplits(train=train, train_eval=train, test=CharWindows(tokens[train_end:], block_size, eval_stride),
                        num_classes=len(vocabulary), input_shape=(block_size,), classes=vocabulary,
                        settings=settings, validation=held_out)
