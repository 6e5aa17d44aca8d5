"""The server kit shared by the three Modelyard services.

asyncio gRPC server bootstrap with health and reflection (`server`), domain
errors and their one mapping to gRPC statuses (`errors`, `interceptors`),
settings from flags and `MODELYARD_*` environment variables (`settings`), and
logging with request ids (`logs`).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("modelyard")
except _metadata.PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+unknown"
