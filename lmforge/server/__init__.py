"""The OpenAI-compatible server (extra `server`): `lmforge serve MODEL`.

app.py: routes and middleware; batching.py: the schedulers (continuous batching on ONNX Runtime);
sequence.py: one sequence's sampling and stops; protocol.py: request shapes and error bodies;
metrics.py: Prometheus text; serve.py: loading and uvicorn; static/index.html: the chat page.
"""
