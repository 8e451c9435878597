"""`python -m services.gateway`: flags/env -> GatewayConfig -> uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from services.gateway.app import create_app
from services.gateway.config import build_parser, config_from_args
from shared.rpc.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    if not config.decoders:
        build_parser().error("at least one --decoder (or PRISM_DECODERS) is required")
    configure_logging("gateway", config.log_level)
    app = create_app(config)
    # log_config=None: uvicorn's own lines go through the root logger set up above.
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_config=None,
        log_level=config.log_level.lower(),
        access_log=False,  # our middleware writes one structured access line per request
        timeout_graceful_shutdown=int(config.grace),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
