"""Logical axis names, defined once. Parameters and activations name their dims with these; one
rules table (`config.sharding.rules`, default `DEFAULT_RULES`) maps them to mesh axes."""

BATCH = "batch"  # examples in a batch
LENGTH = "length"  # time / sequence
EMBED = "embed"  # d_model
MLP = "mlp"  # SwiGLU hidden
HEADS = "heads"  # attention heads (query or kv)
KV = "kv"  # head_dim
VOCAB = "vocab"
LAYERS = "layers"  # stacked scan axis

# Mesh axes: data parallel, fully-sharded data parallel (params sharded, gathered per layer), tensor.
MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV, None),
    (VOCAB, "tensor"),
    (LAYERS, None),
)
