"""Vector stores for image embeddings: the contract, LanceDB (embedded), Weaviate (server)."""
