"""Client sub-commands of `modelyard` (models, workers, route, jobs, generate, ...)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client sub-commands to the `modelyard` parser."""
    return None
