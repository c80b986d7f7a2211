"""Jitted KV-cache sampling over any policy module, and decoded completions for text prompts."""

from rlhfjax.sampling.sampler import Rollout, SampleOutput, SamplingConfig, filter_logits, generate
