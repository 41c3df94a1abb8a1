"""The serving engine: one base model, many adapters, one paged memory pool.

Shaped after nano-vllm: sequence state, scheduler, memory pool, model runner, sampler and
engine loop each live in a short module of their own.
"""
