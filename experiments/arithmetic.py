"""Arithmetic: train a tokenizer and an SFT policy on 2-digit addition with a scratchpad.

    python -m rlhfjax.main --config=experiments/arithmetic.py --workdir=/tmp/arith --config.sft.steps=300
"""

import ml_collections


def model_config():
  m = ml_collections.ConfigDict()
  m.d_model = 128  # residual width
  m.n_layers = 4  # transformer blocks (scanned)
  m.n_heads = 4  # query heads
  m.n_kv_heads = 2  # key/value heads (grouped-query attention)
  m.head_dim = 32  # per-head width
  m.d_ff = 384  # SwiGLU hidden width
  m.rope_base = 10_000.0  # rotary base frequency
  m.tie_embeddings = True  # LM head shares the embedding matrix
  m.dtype = "float32"  # compute dtype ("bfloat16" on TPU/GPU)
  m.param_dtype = "float32"  # parameter storage dtype
  m.remat = False  # recompute layer activations in the backward pass
  m.remat_policy = "full"  # what a recomputed layer keeps: full (nothing) | dots (its matmul outputs)
  m.attention = "einsum"  # no-cache attention: einsum | dot_product (jax.nn.dot_product_attention)
  m.hf_path = ""  # a Hugging Face checkpoint directory: its config.json replaces the fields above
  return m


def rl_config(c):
  """RL sections shared by the RL experiments (`rl` and `ppo` stages): the algorithm (`rl`), its
  optimizers (`rl_optim`), the sampler (`rl_sampling`) and the loop (`rl_loop`)."""
  c.rl = ml_collections.ConfigDict()
  c.rl.algo = "grpo"  # ppo | grpo | rloo | reinforce_pp | best_of_n
  c.rl.group_size = 8  # responses per prompt (>= 2 for group baselines)
  c.rl.epochs = 1  # passes over each rollout batch
  c.rl.minibatch_size = 64  # responses per optimizer step
  c.rl.microbatch_size = 0  # gradient accumulation chunk (0 = off)
  c.rl.clip_eps = 0.2  # PPO ratio clip
  c.rl.clip_eps_high = 0.0  # asymmetric upper clip (DAPO 0.28); 0 = symmetric
  c.rl.dual_clip = 0.0  # dual clip bound (> 1); 0 = off
  c.rl.aggregation = "token"  # loss normalization: token | sequence | fixed
  c.rl.value_clip = 0.2  # critic clip range; 0 = off
  c.rl.gamma = 1.0  # discount
  c.rl.lam = 0.95  # GAE lambda
  c.rl.kl_coef = 0.05  # beta, weight of KL(pi || ref)
  c.rl.kl_mode = "auto"  # reward | loss | none; auto = loss for grpo/best_of_n, reward otherwise
  c.rl.kl_estimator = "k1"  # per-token KL estimator in the reward: k1 | k2 | k3
  c.rl.adaptive_kl = False  # adaptive KL controller (Ziegler et al. 2019)
  c.rl.kl_target = 6.0  # controller target KL (nats per sequence)
  c.rl.kl_horizon = 10_000.0  # controller horizon (samples)
  c.rl.entropy_coef = 0.0  # entropy bonus
  c.rl.whiten_rewards = False  # scale scores by their batch std
  c.rl.whiten_advantages = True  # normalize PPO / RLOO advantages
  c.rl.advantage_scale = "group"  # GRPO std: group | batch | none
  c.rl.best_of_n_k = 1  # best-of-N: top-k positive / bottom-k negative per group
  c.rl.missing_eos_penalty = 0.0  # added to the score when a response never ends
  c.rl.shared_trunk = False  # ppo: one trunk with LM + value heads and one optimizer
  c.rl.vf_coef = 0.1  # value-loss weight in the joint loss when shared_trunk
  c.rl.reuse_logprobs = True  # 1 epoch over 1 minibatch: old log-probs from the update's own forward
  c.rl.pack = False  # pack sequences into few rows (one minibatch per step): forwards over real tokens only
  c.rl.tis_cap = 0.0  # truncated importance sampling of sampler/trainer mismatch (2 in verl/TRL; 0 = off)
  c.rl.per_layer_update = False  # the update per layer, the last layer on predicting columns only (small models)
  c.rl.sampler_logprobs = False  # off-policy steps: old log-probs from the sampler, no policy forward before the update
  c.rl.share_prompt = False  # one row per group, its prompt once (GRPO family; one minibatch per step)
  c.rl_optim = ml_collections.ConfigDict()
  c.rl_optim.learning_rate = 1e-4  # policy AdamW lr
  c.rl_optim.value_learning_rate = 1e-4  # critic AdamW lr (ppo)
  c.rl_optim.warmup_steps = 5  # optimizer warmup steps
  c.rl_optim.weight_decay = 0.0  # decoupled weight decay
  c.rl_optim.grad_clip = 1.0  # global-norm clip
  c.rl_sampling = ml_collections.ConfigDict()
  c.rl_sampling.temperature = 1.0  # sampling temperature (log-probs use the same)
  c.rl_sampling.top_k = 0  # top-k sampling (0 = off)
  c.rl_sampling.top_p = 1.0  # nucleus sampling (1 = off)
  c.rl_sampling.max_new_tokens = 0  # response budget (0 = data.max_response_len)
  c.rl_sampling.dtype = ""  # sampler compute / KV-cache dtype ("" = the policy's; "bfloat16")
  c.rl_reward = "math:1.0"  # verifier rewards and weights for the `rl` stage, e.g. "math:1,format:0.1"
  c.rl_loop = ml_collections.ConfigDict()
  c.rl_loop.iterations = 60  # sample -> score -> update rounds
  c.rl_loop.prompts_per_iter = 16  # distinct prompts per iteration
  c.rl_loop.eval_every = 20  # eval every N iterations (0 = before/after only)
  c.rl_loop.eval_examples = 128  # held-out problems per eval
  c.rl_loop.eval_samples = 4  # samples per problem for pass@k / maj@k
  c.rl_loop.log_every = 1  # metrics every N iterations
  c.rl_loop.checkpoint_every = 10  # save every N iterations
  c.rl_loop.keep_checkpoints = 2  # checkpoints kept
  c.rl_loop.nan_reward = "zero"  # unscorable (NaN) reward: zero | mask (drop from the loss) | raise
  c.rl_loop.max_unscored_share = 0.5  # stop when more than this share of completions is unscored ...
  c.rl_loop.max_unscored_iters = 3  # ... this many iterations in a row (0 = never stop)
  c.rl_loop.max_skipped_iters = 3  # stop after this many iterations in a row with a non-finite update skipped (0 = never)
  c.rl_loop.update_variant = "jit"  # update parallelism: jit (GSPMD, data+fsdp+tensor) | shard_map (explicit psum over data)


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds init, data order and sampling
  c.stages = "sft"  # comma-separated stages run in order: sft, rm, ppo, rl

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # existing sentencepiece .model; "" = train one into <workdir>/tokenizer.model
  c.tokenizer.vocab_size = 96  # target vocabulary when training (digits are always single tokens)
  c.tokenizer.thinking = ("<think>", "</think>")  # a Hugging Face tokenizer's reasoning tags
  c.tokenizer.template_kwargs = {}  # extra chat-template variables, e.g. {"enable_thinking": False}

  c.data = ml_collections.ConfigDict()
  c.data.source = "arithmetic"  # arithmetic (built here) | file (JSONL / Parquet, keys below) | code (generated Python tasks)
  c.data.train_path = ""  # file: the training file
  c.data.test_path = ""  # file: the held-out file; "" = hash-split train_path by prompt
  c.data.test_fraction = 0.1  # file: share hashed into test when test_path is ""
  c.data.fields = {"prompt": "prompt", "answer": "answer"}  # file: our key -> the file's key
  c.data.answer_format = "auto"  # file: gsm8k ("... #### 72") | plain | auto
  c.data.max_bad_fraction = 0.0  # file: share of bad records tolerated before a one-line error
  c.data.data_dir = ""  # TFDS data dir; "" = <workdir>/tfds
  c.data.ops = "+"  # operators drawn uniformly, any of "+-*"
  c.data.min_digits = 2  # fewest digits per operand
  c.data.max_digits = 2  # most digits per operand
  c.data.min_digits_b = 0  # the second operand's digit range (0 = as the first's)
  c.data.max_digits_b = 0
  c.data.thinking = True  # demonstrations carry a <thinking> scratchpad
  c.data.thinking_prob = 1.0  # share of demonstrations that show the scratchpad (the rest answer directly)
  # teacher weakness: "none", "drop_carry" (forgets carries) or "drop_final_carry" (forgets only
  # the carry out of the leading column)
  c.data.flaw = "none"
  c.data.flaw_prob = 1.0  # how often the flawed teacher forgets a carry of its class
  c.data.chatter = 0.0  # teacher style: share of demonstrations padded with 1-3 filler sentences
  c.data.repeat = 0.0  # teacher style: share of demonstrations that state the answer twice
  c.data.num_train = 10_000  # training examples
  c.data.num_test = 1_000  # held-out examples (questions disjoint from train)
  c.data.max_prompt_len = 16  # prompt tokens (left-padded); longer prompts are an error
  c.data.max_response_len = 40  # response tokens incl. EOS (right-padded)

  c.model = model_config()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.sharding = ml_collections.ConfigDict()
  # logical axis -> mesh axes; the one rules table (see rlhfjax/parallel/axes.py)
  c.sharding.rules = (("batch", ("data", "fsdp")), ("length", None), ("embed", "fsdp"),
                      ("mlp", "tensor"), ("heads", "tensor"), ("kv", None), ("vocab", "tensor"),
                      ("layers", None))

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 300  # optimizer updates
  c.sft.batch_size = 32  # global batch
  c.sft.learning_rate = 3e-3  # peak AdamW learning rate
  c.sft.warmup_steps = 30  # linear warmup steps
  c.sft.min_lr_ratio = 0.1  # cosine floor as a fraction of the peak
  c.sft.weight_decay = 0.01  # decoupled weight decay on matrices
  c.sft.grad_clip = 1.0  # global-norm clip (0 = off)
  c.sft.log_every = 20  # metrics every N steps
  c.sft.eval_every = 0  # eval every N steps (0 = before and after only)
  c.sft.eval_examples = 128  # held-out problems for accuracy (0 = skip)
  c.sft.checkpoint_every = 100  # save every N steps and at the end
  c.sft.keep_checkpoints = 2  # checkpoints kept

  rl_config(c)

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64  # prompts per sampling batch
  c.eval.temperature = 1.0  # temperature of the "sampled" accuracy

  c.lock()
  return c
