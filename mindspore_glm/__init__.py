"""ChatGLM2 in MindSpore (the production backend)."""
from mindspore_glm.model import ChatGLM2ForConditionalGeneration

__all__ = ["ChatGLM2ForConditionalGeneration"]
