"""TGI logs with loguru; without it (unit tests outside a TGI image) the standard logging module does."""

try:
    from loguru import logger
except ImportError:  # pragma: no cover - depends on the environment
    import logging

    logger = logging.getLogger("jdlora_tgi")

__all__ = ["logger"]
