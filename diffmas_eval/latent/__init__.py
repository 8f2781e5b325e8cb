"""The DiffMAS core: latent trace (``trace``), realignment (``realign``), agent chain (``chain``)."""

from .chain import AgentChain, Generation, NonFiniteTraceError, TraceTooLongError
from .config import LatentConfig
from .trace import LatentTrace, Segment

__all__ = ["AgentChain", "Generation", "LatentConfig", "LatentTrace", "NonFiniteTraceError", "Segment",
           "TraceTooLongError"]
