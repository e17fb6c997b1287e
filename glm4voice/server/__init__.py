"""The token server behind ``model_server.py``: settings, request validation, the NDJSON wire
format, admission control, metrics and the streaming response."""
