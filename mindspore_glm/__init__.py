"""ChatGLM2 in MindSpore (the production backend).

The package imports MindSpore lazily (on first use of :class:`ChatGLM2ForConditionalGeneration`), so its
framework-free modules (the launcher ``mindspore_glm.launch``, the memory plan ``mindspore_glm.plan``)
start without it.
"""

__all__ = ["ChatGLM2ForConditionalGeneration"]


def __getattr__(name):
    if name == "ChatGLM2ForConditionalGeneration":
        from mindspore_glm.model import ChatGLM2ForConditionalGeneration
        return ChatGLM2ForConditionalGeneration
    raise AttributeError(f"module 'mindspore_glm' has no attribute {name!r}")
