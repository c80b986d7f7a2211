"""rlhfjax: JAX/Flax post-training (SFT, reward models, RL with verifiers).

`import rlhfjax` is cheap: subpackages and the names below load on first attribute access, so
`rlhfjax.rl.gae` pulls in JAX but not TFDS, Orbax or matplotlib.

    import rlhfjax
    cfg = rlhfjax.TransformerConfig(vocab_size=256)
    params = rlhfjax.init_params(rlhfjax.PolicyModel(cfg), jax.random.key(0))
    out = rlhfjax.generate(params, prompt_ids, prompt_mask, rng, rlhfjax.SamplingConfig(cfg, 32, eos_id=2))
"""

from __future__ import annotations

import importlib
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (~5 ms)

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "config", "data", "metrics", "models", "parallel", "rewards", "rl",
               "sampling", "tokenizer", "train")

# public name -> module that defines it
_NAMES = {
    **dict.fromkeys(("TransformerConfig", "PolicyModel", "ValueModel", "RewardModel", "init_params"),
                    "rlhfjax.models"),
    **dict.fromkeys(("generate", "SamplingConfig", "SampleOutput"), "rlhfjax.sampling"),
    "create_mesh": "rlhfjax.parallel",
    "Tokenizer": "rlhfjax.tokenizer",
    "train_and_evaluate": "rlhfjax.train.pipeline",
}

__all__ = ["__version__", *_SUBMODULES, *_NAMES]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
  from rlhfjax import checkpoint, config, data, metrics, models, parallel, rewards, rl, sampling  # noqa: F401
  from rlhfjax import tokenizer, train  # noqa: F401
  from rlhfjax.models import PolicyModel, RewardModel, TransformerConfig, ValueModel, init_params  # noqa: F401
  from rlhfjax.parallel import create_mesh  # noqa: F401
  from rlhfjax.sampling import SampleOutput, SamplingConfig, generate  # noqa: F401
  from rlhfjax.tokenizer import Tokenizer  # noqa: F401
  from rlhfjax.train.pipeline import train_and_evaluate  # noqa: F401


def __getattr__(name: str):
  if name in _SUBMODULES:
    value = importlib.import_module(f"rlhfjax.{name}")
  elif name in _NAMES:
    value = getattr(importlib.import_module(_NAMES[name]), name)
  else:
    raise AttributeError(f"module 'rlhfjax' has no attribute {name!r}")
  globals()[name] = value  # cache: later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
