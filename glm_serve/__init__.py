"""Serving ChatGLM2: an OpenAI-compatible HTTP server with continuous batching (``glm2-serve``), a
terminal chat (``glm2-chat``) and a web chat page, over either backend (torch_glm or mindspore_glm).

Backend-free: the backends are imported only by :mod:`glm_serve.backends` when a model is loaded.
"""
