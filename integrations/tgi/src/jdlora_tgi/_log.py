"""The backend's logger: TGI's loguru logger, with records that pass TGI's log filter.

TGI's ``serve`` and ``download-weights`` commands replace loguru's sinks by one with
``filter="text_generation_server"``, which keeps only records whose ``name`` (the calling module) is in TGI's
package; records of ``jdlora_tgi.*`` would be dropped. Ours are therefore named
``text_generation_server.jdlora_tgi.<module>`` (the module itself stays in ``extra["jdlora_module"]``), so
they reach TGI's log at TGI's level and in TGI's format (plain or ``--json-output``).
Without loguru (unit tests outside a TGI environment) the standard logging module logs.
"""

TGI_LOGGER = "text_generation_server"  # the filter of TGI 3.3.7's cli.serve / cli.download_weights sink

try:
    from loguru import logger as _loguru
except ImportError:  # pragma: no cover - depends on the environment
    import logging

    logger = logging.getLogger("jdlora_tgi")
else:

    def _under_tgi(record: dict) -> None:
        record["extra"]["jdlora_module"] = record["name"]
        record["name"] = f"{TGI_LOGGER}.{record['name']}"

    logger = _loguru.patch(_under_tgi)

__all__ = ["TGI_LOGGER", "logger"]
