"""`python -m trainer_service [flags]`: run the trainer server."""

from __future__ import annotations

import os
import sys

from server_kit import settings as settings_mod
from server_kit.common import make_server, serve_forever
from trainer_service.app import TrainerApp
from trainer_service.settings import TrainerSettings


def main(argv: list[str] | None = None) -> int:
    # The trainer reads models and datasets from local folders only: never reach the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    settings = settings_mod.parse(
        TrainerSettings, argv, "python -m trainer_service", "Run the Modelyard trainer service."
    )
    serve_forever([make_server(TrainerApp(settings), settings.listen, settings)], settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
