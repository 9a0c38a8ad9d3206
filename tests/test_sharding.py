"""Sharded and unsharded runs give the same numbers for the same keys.

XLA fixes the number of host devices when JAX starts, so each check runs a
script in a fresh Python process with four forced CPU devices.
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(script: str, num_devices: int = 4) -> str:
    env = dict(os.environ,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                            capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_estimators_sharded_equal_unsharded():
    out = run_with_devices("""
        import jax, numpy as np
        from hi_jax import TableHarm, TabularPolicy, estimate_profile
        from hi_jax.sharding import batch_mesh
        from hi_jax.transformer import TransformerConfig, TransformerPolicy
        assert jax.device_count() == 4, jax.devices()
        tabular = TabularPolicy.random(jax.random.key(0), 3, 4)
        transformer = TransformerPolicy.init(jax.random.key(1), TransformerConfig(
            vocab_size=3, response_length=4, width=8, depth=1, num_heads=2))
        harm = TableHarm(jax.random.uniform(jax.random.key(2), (3,) * 4))
        runs = [(tabular, "rao_blackwell"), (tabular, "pick_freeze"),
                (transformer, "pick_freeze")]
        for policy, method in runs:
            kwargs = dict(num_sequences=32, num_continuations=2, num_groups=4,
                          info_method=method)
            plain = estimate_profile(jax.random.key(3), policy, harm, **kwargs)
            sharded = estimate_profile(jax.random.key(3), policy, harm,
                                       mesh=batch_mesh(), **kwargs)
            for field in ("I", "G_norm_sq", "cs_pointwise", "fisher_trace_mean"):
                a, b = getattr(plain, field), getattr(sharded, field)
                np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(a.stderr, b.stderr, rtol=1e-4, atol=1e-7)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_training_step_sharded_equals_unsharded():
    out = run_with_devices("""
        import jax, numpy as np
        from hi_jax import TableHarm, training
        from hi_jax.sharding import batch_mesh
        from hi_jax.transformer import TransformerConfig, TransformerPolicy
        policy = TransformerPolicy.init(jax.random.key(1), TransformerConfig(
            vocab_size=3, response_length=4, width=8, depth=1, num_heads=2))
        harm = TableHarm(jax.random.uniform(jax.random.key(2), (3,) * 4))
        optimizer = training.make_optimizer(training.validate_align_config(
            training.default_align_config()))
        state = training.AlignState(jax.numpy.int32(0), policy.params,
                                    optimizer.init(policy.params), jax.random.key(3))
        results = []
        for mesh in (None, batch_mesh()):
            update = training.make_align_step(policy, harm, optimizer, batch_size=16,
                                              lam=2.0, mesh=mesh)
            new_state, metrics = update(state, policy, None, None)
            results.append((new_state.params, metrics))
        (plain, plain_metrics), (sharded, sharded_metrics) = results
        # The first Adam update is lr * g / (|g| + eps): for entries with a
        # gradient near eps, float32 summation order moves it by up to about
        # 1e-3 of the learning rate (1e-3), hence atol=1e-6 on parameters.
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for name in ("harm", "kl", "total", "grad_norm"):
            np.testing.assert_allclose(plain_metrics[name], sharded_metrics[name],
                                       rtol=1e-5, atol=1e-7)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_mesh_size_must_divide_batch():
    out = run_with_devices("""
        import jax
        from hi_jax import TableHarm, TabularPolicy, estimate_profile
        from hi_jax.sharding import batch_mesh
        policy = TabularPolicy.random(jax.random.key(0), 2, 2)
        harm = TableHarm(jax.numpy.ones((2, 2)) * 0.5)
        try:
            estimate_profile(jax.random.key(0), policy, harm, num_sequences=18,
                             num_continuations=2, num_groups=3, mesh=batch_mesh())
        except ValueError as error:
            print(error)
    """)
    assert ("num_sequences / num_groups = 18 / 3 = 6 outer samples per group must be "
            "divisible by the 4 devices") in out


def test_profile_command_shards_over_local_devices(tmp_path):
    out = run_with_devices(f"""
        import jax
        from experiments import profile
        from experiments.configs import profile as profile_config
        assert jax.local_device_count() == 4, jax.devices()
        results = {{}}
        for shard in (True, False):
            config = profile_config.get_config()
            config.vocab_size, config.response_length, config.horizon = 3, 3, 2
            config.num_sequences, config.num_groups = 32, 4
            config.num_continuations = 2
            config.shard = shard
            workdir = r"{tmp_path}" + f"/run_{{shard}}"
            results[shard] = profile.run_profile(config, workdir)["monte_carlo"]
        for field in ("I", "G_norm_sq", "cs_pointwise"):
            sharded, plain = results[True][field], results[False][field]
            for a, b in zip(sharded["mean"], plain["mean"]):
                assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (field, a, b)
        config.num_sequences, config.num_groups, config.shard = 18, 3, True
        try:
            profile.run_profile(config, r"{tmp_path}" + "/indivisible")
        except ValueError as error:
            assert "--config.shard=False" in str(error), error
        else:
            raise AssertionError("6 outer samples per group on 4 devices passed")
        print("ok")
    """)
    assert out.strip().endswith("ok")
