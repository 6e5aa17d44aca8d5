"""`python -m gateway [flags]`: run the OpenAI-compatible HTTP gateway."""

from __future__ import annotations

import sys

from gateway.server import serve_forever
from gateway.settings import GatewaySettings
from server_kit import settings as settings_mod


def main(argv: list[str] | None = None) -> int:
    settings = settings_mod.parse(
        GatewaySettings, argv, "python -m gateway", "Run the Modelyard OpenAI-compatible HTTP gateway."
    )
    serve_forever([], settings, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
