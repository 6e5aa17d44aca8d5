"""Client sub-commands of `modelyard`: models, workers, route, train, jobs, generate, chat, embed.

Each command talks to one service through the typed clients; addresses come
from `--catalog/--trainer/--inference` or the `MODELYARD_*_ADDRESS`
environment variables. `--json` prints the RPC's answer as proto JSON.
"""

from __future__ import annotations

from clients.commands import demo, generation, images, models, training, workers
from clients.commands.common import Subparsers


def register(sub: Subparsers) -> None:
    """Add the client sub-commands to the `modelyard` parser."""
    models.register(sub)
    workers.register(sub)
    training.register(sub)
    generation.register(sub)
    images.register(sub)
    demo.register(sub)
