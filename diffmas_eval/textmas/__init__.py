"""Text multi-agent baselines: the same roles and prompts as DiffMAS, messages passed as text."""

from .backends import BackendError, Completion, HFBackend, OpenAIBackend
from .chain import AgentText, TextChain, TextTrace

__all__ = ["AgentText", "BackendError", "Completion", "HFBackend", "OpenAIBackend", "TextChain", "TextTrace"]
