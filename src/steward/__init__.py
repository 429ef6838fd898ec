"""Steward: responsible LLM development and deployment."""

__version__ = "0.1.0"
