"""ChatMusician on Ray: an LLM that reads and writes music as ABC notation, as a distributed platform."""

__version__ = "0.1.0"
