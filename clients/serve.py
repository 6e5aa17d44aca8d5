"""`modelyard serve`: run one service, or all three and the HTTP gateway, in one process."""

from __future__ import annotations

import argparse
import dataclasses
import os

from server_kit.common import CommonSettings, make_server, serve_forever
from server_kit.server import GrpcServer
from server_kit.settings import load


def serve(service: str, args: argparse.Namespace) -> int:
    """Run `service` (`catalog`, `trainer`, `inference`, `gateway` or `all`) until SIGTERM/SIGINT."""
    common = load(CommonSettings, args)
    shared = {f.name: getattr(common, f.name) for f in dataclasses.fields(CommonSettings)}
    servers: list[GrpcServer] = []
    names = ["catalog", "trainer", "inference", "gateway"] if service == "all" else [service]
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
    if "gateway" in names:
        from gateway.server import serve_forever as serve_with_gateway
        from gateway.settings import GatewaySettings

        gateway = load(GatewaySettings, **shared)
        if catalog_address and "MODELYARD_CATALOG_ADDRESS" not in os.environ:
            gateway.catalog_address = catalog_address
        serve_with_gateway(servers, gateway, common)
        return 0
    serve_forever(servers, common)
    return 0
