"""Jitted KV-cache sampling."""

from rlhfjax.sampling.sampler import SampleOutput, SamplingConfig, filter_logits, generate
