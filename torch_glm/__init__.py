"""PyTorch twin of the ChatGLM2 stack: the model (HF names and layouts), generation, LoRA/P-tuning, training."""
from torch_glm.model import ChatGLM2ForConditionalGeneration

__all__ = ["ChatGLM2ForConditionalGeneration"]
