"""Shared by both backends, numpy only: config, tokenizer, prompt format, parameter names, data, metrics."""
from glm_common.config import ChatGLM2Config, ConfigError, RunOptions, preset

__all__ = ["ChatGLM2Config", "ConfigError", "RunOptions", "preset"]
