"""The API room: FastAPI routes and the WebSocket connection object. No tensors here; the engine does the work."""
