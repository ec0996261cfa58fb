#!/usr/bin/env python
"""Truncation accuracy (CA vs TT vs NKVT): `python scripts/eval_accuracy.py --quick --json out.json`."""
import sys

from attnstore_hf.cli.eval_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
