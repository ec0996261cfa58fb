"""Command-line entry points: chat, bench."""
