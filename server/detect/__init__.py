"""Gradient-health detection: detector configuration, state codec, rules and event service."""
