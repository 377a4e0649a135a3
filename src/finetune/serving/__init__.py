"""finetune serve: the web app and HTTP API, request handling, the served model, dynamic batching, the server."""
