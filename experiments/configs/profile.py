"""Default config of `hi-jax profile`: a random tabular world small enough to enumerate."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root PRNG seed, an integer >= 0.

    # Policy: "tabular" (random logits), "npz" (tabular logits from a file)
    # or "transformer" (randomly initialised).
    config.model = "tabular"
    config.vocab_size = 4  # V >= 2; also the transformer's output vocabulary.
    config.response_length = 5  # T >= 1 response tokens.
    config.logit_scale = 1.5  # Std of the random tabular logits, >= 0.
    config.logits_path = ""  # .npz with arrays logits_0 .. logits_{T-1}, for "npz".
    config.width = 32  # Transformer width, divisible by num_heads.
    config.depth = 2  # Transformer blocks, >= 1.
    config.num_heads = 2  # Attention heads, >= 1.
    config.mlp_ratio = 4  # MLP hidden size / width, >= 1.

    # Harm: "table" (random table over all responses), "horizon" (random
    # table over the first `horizon` tokens) or "decaying" (smooth harm whose
    # dependence on y_t falls as decay**t).
    config.harm = "horizon"
    config.horizon = 3  # k in [1, T] for the "horizon" harm.
    config.decay = 0.5  # In (0, 1], for the "decaying" harm.

    # Estimators (see hi_jax.estimate_profile).
    config.num_sequences = 512  # N outer samples, >= 3.
    config.num_continuations = 8  # M continuations per branch, >= 2.
    # "rao_blackwell" or "pick_freeze" (unbiased); "plug_in" or "nested" (biased baselines).
    config.info_method = "rao_blackwell"
    config.top_k = 0  # Candidates enumerated per prefix; 0 enumerates all V.
    config.num_branches = 0  # Tokens sampled per prefix by "nested"; 0 samples V.
    config.fisher_method = "exact"  # "exact" or "hutchinson".
    config.num_probes = 4  # Hutchinson probes per prefix, >= 1.
    # Groups of outer samples for ||G_t||^2 and the jackknife, dividing N;
    # 0 takes the largest divisor of N up to 32.
    config.num_groups = 0
    # With several local devices, shard each group's outer samples over all
    # of them (N / num_groups must then be divisible by the device count).
    config.shard = True
    # Exact oracle: "auto" (when V**T <= 65536), "always" or "never".
    config.exact = "auto"
    return config
