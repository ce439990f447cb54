"""enrich-server: a real-time data partner server for Index Exchange and DMPs."""

__version__ = "0.1.0"
