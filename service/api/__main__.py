"""`python -m service.api`: the HTTP front end alone; workers run elsewhere (needs REDIS_URL)."""

from __future__ import annotations

import logging
import sys

from service.api.allocator import tune_allocator
from service.api.app import create_app, serve
from service.logs import configure_logging
from service.queue.capacity import check_or_exit
from service.settings import load_settings

logger = logging.getLogger("service.api")


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    if not settings.redis_url:
        logger.error(
            "REDIS_URL is not set: the API alone has no worker to reach. Set REDIS_URL, or run "
            "`python -m service` (API + in-process queue + worker in one process)."
        )
        sys.exit(2)
    check_or_exit(settings, logger)
    tune_allocator()
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
