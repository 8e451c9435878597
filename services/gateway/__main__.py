"""`python -m services.gateway`: flags/env -> GatewayConfig -> uvicorn."""

from __future__ import annotations

import sys

import uvicorn
from uvicorn.server import STARTUP_FAILURE

from services.gateway.app import create_app
from services.gateway.config import build_parser, config_from_args
from services.gateway.drain import Drain, DrainGate, DrainingServer
from shared.rpc.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    if not config.decoders:
        build_parser().error("at least one --decoder (or PRISM_DECODERS) is required")
    configure_logging("gateway", config.log_level)
    drain = Drain()
    # log_config=None: uvicorn's own lines go through the root logger set up above.
    server_config = uvicorn.Config(
        DrainGate(create_app(config), drain),
        host=config.host,
        port=config.port,
        log_config=None,
        log_level=config.log_level.lower(),
        access_log=False,  # our middleware writes one structured access line per request
        timeout_graceful_shutdown=int(config.grace),
    )
    # SIGTERM: /ready and new requests get 503 while running streams finish (drain.py).
    server = DrainingServer(server_config, drain, config.grace)
    server.run()
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
