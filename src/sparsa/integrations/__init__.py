"""Integrations with other libraries, each imported on its own (``sparsa.integrations.transformers``)."""
