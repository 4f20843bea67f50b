"""Serve the model over HTTP with a dashboard page."""
