"""The streaming server: the API (server.api, no tensors) -> the engine (server.engine, owns the device)."""
