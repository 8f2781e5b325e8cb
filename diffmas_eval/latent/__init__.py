"""The DiffMAS core: latent trace (``trace``), realignment (``realign``), agent chain (``chain``), its options
(``config``), where its layers run and how they are sharded (``distributed``), and a trained chain saved and
loaded as one artifact (``persist``: ``load_trained_chain``). The core imports only the package's other core
modules (prompts, stopping, answers, stability, memory, models), never the adapters (harness, training,
serving) or the tools above them."""

from .chain import AgentChain, Generation, NonFiniteTraceError, TraceTooLongError
from .config import LatentConfig
from .trace import LatentTrace, Segment

__all__ = ["AgentChain", "Generation", "LatentConfig", "LatentTrace", "NonFiniteTraceError", "Segment",
           "TraceTooLongError"]
