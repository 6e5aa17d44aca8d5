"""`modelyard serve`: run one service or all three in one process."""

from __future__ import annotations

import argparse
import dataclasses

from server_kit.common import CommonSettings, make_server, serve_forever
from server_kit.server import GrpcServer
from server_kit.settings import load


def serve(service: str, args: argparse.Namespace) -> int:
    """Run `service` (`catalog`, `trainer`, `inference` or `all`) until SIGTERM/SIGINT."""
    common = load(CommonSettings, args)
    shared = {f.name: getattr(common, f.name) for f in dataclasses.fields(CommonSettings)}
    servers: list[GrpcServer] = []
    names = ["catalog", "trainer", "inference"] if service == "all" else [service]
    catalog_address = ""
    if "catalog" in names:
        from catalog_service.app import CatalogApp
        from catalog_service.settings import CatalogSettings

        catalog = load(CatalogSettings, **shared)
        servers.append(
            make_server(CatalogApp(catalog), catalog.listen, common, metrics_port=catalog.metrics_port)
        )
        catalog_address = "localhost:" + catalog.listen.rsplit(":", 1)[1]
    if "trainer" in names:
        from trainer_service.app import TrainerApp
        from trainer_service.settings import TrainerSettings

        trainer = load(TrainerSettings, **shared)
        if not trainer.catalog_address and catalog_address:
            trainer.catalog_address = catalog_address
        servers.append(
            make_server(TrainerApp(trainer), trainer.listen, common, metrics_port=trainer.metrics_port)
        )
    if "inference" in names:
        from inference_service.app import InferenceApp
        from inference_service.settings import InferenceSettings

        inference = load(InferenceSettings, **shared)
        if not inference.catalog_address and catalog_address:
            inference.catalog_address = catalog_address
        servers.append(
            make_server(
                InferenceApp(inference), inference.listen, common, metrics_port=inference.metrics_port
            )
        )
    serve_forever(servers, common)
    return 0
