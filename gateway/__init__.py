"""The OpenAI-compatible HTTP gateway: `/v1/models`, `/v1/completions`, `/v1/chat/completions`,
`/v1/embeddings`.

A stateless FastAPI app in front of the gRPC services: it lists READY catalog LLMs and
adapters, routes each request with the catalog's `FindWorkers` (through
`clients.routing.AsyncRoutedInferenceClient`) and forwards it over gRPC with the caller's
bearer token, so the services' role table decides 401/403. See docs/decisions.md
("OpenAI-compatible gateway") and docs/operations.md ("The HTTP gateway").
"""
