"""Default config of `hi-jax demo`: shallow versus deep alignment on a 2-core CPU."""

import ml_collections

from hi_jax import training
from hi_jax import world


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root PRNG seed, an integer >= 0.

    # The synthetic refusal world (see hi_jax.world.default_world_config):
    # group sizes, response length T, training-harm horizon k, and the
    # teacher's probabilities of complying, recovering and ending.
    config.world = world.default_world_config()

    # The transformer (see hi_jax.TransformerConfig).
    config.model = ml_collections.ConfigDict()
    config.model.width = 32  # Residual width, divisible by num_heads.
    config.model.depth = 2  # Transformer blocks, >= 1.
    config.model.num_heads = 2  # Attention heads, >= 1.
    config.model.mlp_ratio = 4  # MLP hidden size / width, >= 1.

    # Base model: maximum likelihood on teacher samples.
    config.pretrain = training.default_pretrain_config()
    config.pretrain.steps = 600
    config.pretrain.batch_size = 128
    config.pretrain.learning_rate = 3e-3

    # Alignment settings shared by both objectives; lam weighs the training
    # harm. The standard run uses mu = 0, the deep run deep_mu and deep_gamma.
    config.align = training.default_align_config()
    config.align.steps = 300
    config.align.batch_size = 64
    config.align.learning_rate = 3e-3
    config.align.lam = 5.0
    config.align.checkpoint_every = 100
    config.align.log_every = 50
    config.align.eval_every = 100
    config.deep_mu = 2.0  # Recovery weight mu of the deep objective, >= 0.
    config.deep_gamma = 1.0  # Recovery discount gamma of the deep objective, in (0, 1].
    config.num_q_prefixes = 128  # Q prefixes (full length T) in the deep objective, >= 1.

    # Evaluation, on the same keys and prefixes for every model.
    config.eval = ml_collections.ConfigDict()
    config.eval.num_eval_sequences = 512  # Samples for KL, recovery and harm rates, >= 2.
    config.eval.num_profile_sequences = 64  # N outer samples of the bound profile, >= 3.
    config.eval.num_continuations = 4  # M per branch, >= 2.
    config.eval.info_method = "rao_blackwell"  # "rao_blackwell" or "pick_freeze".
    config.eval.fisher_method = "hutchinson"  # "exact" or "hutchinson".
    # Bound profiles during alignment use this many outer samples, >= 3.
    config.eval.num_profile_sequences_during_training = 32
    return config
