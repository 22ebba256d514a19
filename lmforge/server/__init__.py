"""The OpenAI-compatible server (extra `server`): `lmforge serve MODEL`.

app.py: routes and middleware; batching.py: the schedulers (continuous batching on ONNX Runtime);
protocol.py: request shapes, error bodies and reply formats; streaming.py: SSE;
metrics.py: Prometheus text; serve.py: loading and uvicorn; static/index.html: the chat page.
"""
