"""The OpenAI-compatible gateway: auth, limits, guards, backends, trace and audit on every request."""
