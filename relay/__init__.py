"""chert-relay: a webhook relay and event-ingestion daemon for the Chert Messaging API."""

__version__ = "0.1.0"
