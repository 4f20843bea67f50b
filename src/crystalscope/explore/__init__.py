"""Explore and explain: maps of the embeddings, interactive pages, class activation maps."""
