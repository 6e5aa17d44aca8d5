"""`python -m inference_service [flags]`: run the inference server."""

from __future__ import annotations

import sys

from inference_service.app import InferenceApp
from inference_service.settings import InferenceSettings
from server_kit import settings as settings_mod
from server_kit.common import make_server, serve_forever


def main(argv: list[str] | None = None) -> int:
    settings = settings_mod.parse(
        InferenceSettings, argv, "python -m inference_service", "Run the Modelyard inference service."
    )
    serve_forever([make_server(InferenceApp(settings), settings.listen, settings)], settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
