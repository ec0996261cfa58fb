#!/usr/bin/env python
"""Chat with the bundled Gemma 3 270M (or --model DIR); see `python scripts/chat.py --help`."""
import sys

from attnstore_hf.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
