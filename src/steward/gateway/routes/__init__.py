"""Thin route functions; the work is in `steward.gateway.service`."""
