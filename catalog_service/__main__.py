"""`python -m catalog_service [migrate] [flags]`: run the catalog server, or migrate its database."""

from __future__ import annotations

import sys

from catalog_service.app import CatalogApp
from catalog_service.settings import CatalogSettings
from server_kit import settings as settings_mod
from server_kit.common import make_server, serve_forever


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["migrate"]:
        settings = settings_mod.parse(
            CatalogSettings,
            args[1:],
            "python -m catalog_service migrate",
            "Upgrade the catalog database to the latest schema.",
        )
        from catalog_service.db import migrate

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(settings.resolved_database_url())
        print("catalog database is at the latest revision")
        return 0
    settings = settings_mod.parse(
        CatalogSettings, args, "python -m catalog_service", "Run the Modelyard catalog."
    )
    serve_forever([make_server(CatalogApp(settings), settings.listen, settings)], settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
