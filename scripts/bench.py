#!/usr/bin/env python
"""Benchmarks: `python scripts/bench.py reuse --json out.json`, `python scripts/bench.py growth`."""
import sys

from attnstore_hf.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
