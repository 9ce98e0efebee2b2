"""Library messages that tell a condkit user nothing: filtered before diffusers loads a pipeline.

transformers warns that image processors fall back to PIL when torchvision is missing; diffusers
imports those classes with every pipeline module, and condkit never uses them. Only that message is
dropped: every other warning of every library still reaches the user.
"""

import logging

_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCHVISION_FALLBACK not in record.getMessage()


_FILTER = _DropTorchvisionFallback()


def drop_irrelevant_library_messages() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
