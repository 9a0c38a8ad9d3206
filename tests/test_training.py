"""Training loops: config validation, compilation, resume, NaN guard and progress."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hi_jax import objectives, training, world
from hi_jax.exact import enumerate_responses
from hi_jax.harms import Harm, TableHarm
from hi_jax.policy import TabularPolicy
from hi_jax.transformer import TransformerConfig, TransformerPolicy

V, T = 3, 3
RECOVERY_IDS = (0,)
Q_LENGTHS = (0, 1, 2, 3, 1, 2)


def tabular_problem(seed=0):
    key_policy, key_harm, key_q = jax.random.split(jax.random.key(seed), 3)
    policy = TabularPolicy.random(key_policy, V, T)
    harm = TableHarm(jax.random.uniform(key_harm, (V,) * T))
    q_tokens = jax.random.randint(key_q, (len(Q_LENGTHS), T), 0, V)
    q_mask = objectives.prefix_mask_from_lengths(jnp.asarray(Q_LENGTHS), T)
    return policy, harm, (q_tokens, q_mask)


def small_config(**fields):
    config = training.default_align_config()
    config.steps = 8
    config.batch_size = 8
    config.learning_rate = 0.1
    config.lam = 2.0
    config.checkpoint_every = 3
    config.log_every = 4
    config.eval_every = 2
    config.update(fields)
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, training.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def exact_eval(harm):
    """An eval_fn that records the exact E[Harm] and the probabilities of y_0."""
    responses = enumerate_responses(V, T)
    harm_values = harm(responses)

    @jax.jit
    def evaluate(policy):
        probs = jnp.exp(policy.sequence_log_prob(responses))
        return {"exact_harm": (probs * harm_values).sum(),
                "root_probs": jax.nn.softmax(policy.params[0])}

    return lambda step, policy: evaluate(policy)


# Config validation ----------------------------------------------------------------


ALIGN_INVALID = [
    ("steps", 0, "an integer >= 1"),
    ("batch_size", 1, "an integer >= 2"),
    ("learning_rate", 0.0, "a finite number > 0"),
    ("learning_rate", float("inf"), "a finite number > 0"),
    ("weight_decay", -0.1, "a finite number >= 0"),
    ("max_grad_norm", -1.0, "a finite number >= 0"),
    ("lam", -1.0, "a finite number >= 0"),
    ("mu", -0.5, "a finite number >= 0"),
    ("mu", float("nan"), "a finite number >= 0"),
    ("gamma", 0.0, r"a finite number in \(0, 1\]"),
    ("gamma", 1.5, r"a finite number in \(0, 1\]"),
    ("q_batch_size", -1, "an integer >= 0"),
    ("checkpoint_every", 0, "an integer >= 1"),
    ("checkpoints_to_keep", 0, "an integer >= 1"),
    ("log_every", 0, "an integer >= 1"),
    ("eval_every", -3, "an integer >= 1"),
    ("seed", -1, "an integer >= 0"),
]


@pytest.mark.parametrize("field,value,allowed", ALIGN_INVALID)
def test_align_config_invalid_field(field, value, allowed, tmp_path):
    config = training.default_align_config()
    config[field] = value
    policy, harm, _ = tabular_problem()
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=f"field {field} must be {allowed}; got "):
        training.align(None, policy, policy, harm, config, workdir)
    # Validation comes before any work, so the run directory was not created.
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("field,value,allowed", [
    ("steps", 2.5, "an integer >= 1"),
    ("batch_size", True, "an integer >= 1"),
    ("learning_rate", "fast", "a finite number > 0"),
])
def test_config_wrong_type(field, value, allowed):
    values = dict(training.default_pretrain_config().items())
    values[field] = value
    message = f"pretrain config field {field} must be {allowed}"
    with pytest.raises(ValueError, match=message):
        training.validate_pretrain_config(values)


def test_config_unknown_and_missing_fields():
    config = training.default_align_config()
    config.lamda = 1.0
    with pytest.raises(ValueError, match=r"unknown align config fields \['lamda'\]"):
        training.validate_align_config(config)
    values = dict(training.default_align_config().items())
    del values["gamma"]
    with pytest.raises(ValueError, match=r"missing the fields \['gamma'\]"):
        training.validate_align_config(values)


def test_default_configs_are_valid():
    training.validate_align_config(training.default_align_config())
    training.validate_pretrain_config(training.default_pretrain_config())


def test_mu_without_q_raises(tmp_path):
    policy, harm, _ = tabular_problem()
    with pytest.raises(ValueError, match="mu=1.0 weights a recovery penalty"):
        training.align(None, policy, policy, harm, small_config(mu=1.0), str(tmp_path))


def test_q_batch_size_larger_than_q_raises(tmp_path):
    policy, harm, q = tabular_problem()
    with pytest.raises(ValueError, match="q_batch_size=7 exceeds the 6 Q prefixes"):
        training.align(None, policy, policy, harm, small_config(q_batch_size=7),
                       str(tmp_path), q_prefixes=q, recovery_ids=RECOVERY_IDS)


# The jitted update ----------------------------------------------------------------


def test_q_sampler_raises_recovery(tmp_path):
    refusal_world = world.WorldConfig.from_sizes(1, 1, 2, 2, response_length=4, horizon=2)
    policy = TabularPolicy.random(jax.random.key(0), refusal_world.vocab_size, 4)
    calls = []

    def sample_q(q_key):
        calls.append(q_key)
        return world.sample_q_prefixes(q_key, refusal_world, 16, 3)

    config = small_config(steps=30, mu=3.0, gamma=1.0, lam=1.0, learning_rate=0.1)
    training.align(jax.random.key(1), policy, policy, world.training_harm(refusal_world),
                   config, str(tmp_path), q_prefixes=sample_q,
                   recovery_ids=refusal_world.groups.refusal)
    assert len(calls) == 30
    np.testing.assert_array_equal(
        jax.random.key_data(calls[4]),
        jax.random.key_data(training.step_keys(jax.random.key(1), 4)["q"]))
    lines = read_metrics(tmp_path)
    first = np.mean(lines[0]["recovery_per_position"])
    last = np.mean(lines[-1]["recovery_per_position"])
    assert last > first + 0.2, (first, last)


def test_q_sampler_shape_change_raises(tmp_path):
    refusal_world = world.WorldConfig.from_sizes(1, 1, 2, 2, response_length=4, horizon=2)
    policy = TabularPolicy.random(jax.random.key(0), refusal_world.vocab_size, 4)
    sizes = iter([8, 8, 6])

    def sample_q(q_key):
        return world.sample_q_prefixes(q_key, refusal_world, next(sizes), 2)

    with pytest.raises(ValueError, match=r"returned shapes \(6, 4\) and \(6, 4\) "
                                         r"after \(8, 4\)"):
        training.align(None, policy, policy, world.training_harm(refusal_world),
                       small_config(mu=1.0), str(tmp_path), q_prefixes=sample_q,
                       recovery_ids=refusal_world.groups.refusal)


def test_align_step_does_not_recompile():
    policy, harm, (q_tokens, q_mask) = tabular_problem()
    optimizer = training.make_optimizer(small_config())
    update = training.make_align_step(policy, harm, optimizer, batch_size=8, lam=2.0,
                                      mu=1.0, gamma=0.7, recovery_ids=RECOVERY_IDS,
                                      q_batch_size=4)
    state = training.AlignState(jnp.zeros((), jnp.int32), policy.params,
                                optimizer.init(policy.params), jax.random.key(0))
    state, first = update(state, policy, q_tokens, q_mask)
    state, second = update(state, policy, q_tokens, q_mask)
    assert update._cache_size() == 1
    assert int(state.step) == 2
    # The two updates drew different samples.
    assert float(first["kl"]) == 0.0
    assert float(second["kl"]) > 0.0


def test_step_keys_depend_only_on_step():
    run_key = jax.random.key(3)
    first = training.step_keys(run_key, 5)
    again = training.step_keys(run_key, 5)
    other = training.step_keys(run_key, 6)
    for name in ("sample", "q"):
        np.testing.assert_array_equal(jax.random.key_data(first[name]),
                                      jax.random.key_data(again[name]))
        assert not np.array_equal(jax.random.key_data(first[name]),
                                  jax.random.key_data(other[name]))
    assert not np.array_equal(jax.random.key_data(first["sample"]),
                              jax.random.key_data(first["q"]))


# Training makes progress ----------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True])
def test_align_lowers_exact_objective(deep, tmp_path):
    policy, harm, q = tabular_problem(1)
    kwargs = dict(lam=4.0)
    fields = dict(steps=60, learning_rate=0.1, lam=4.0, checkpoint_every=100)
    align_kwargs = {}
    if deep:
        kwargs.update(mu=2.0, gamma=0.7, q_tokens=q[0], q_prefix_mask=q[1],
                      recovery_ids=RECOVERY_IDS)
        fields.update(mu=2.0, gamma=0.7)
        align_kwargs = dict(q_prefixes=q, recovery_ids=RECOVERY_IDS)
    before = objectives.exact_objective(policy, policy, harm, **kwargs)
    aligned = training.align(jax.random.key(2), policy, policy, harm,
                             small_config(**fields), str(tmp_path), **align_kwargs)
    after = objectives.exact_objective(aligned, policy, harm, **kwargs)
    # KL starts at 0, so the total can only fall by lowering harm (and recovery).
    assert float(after["total"]) < float(before["total"]) - 0.1
    assert float(after["harm"]) < float(before["harm"])
    if deep:
        assert float(after["recovery"]) < float(before["recovery"])


def test_pretrain_fits_world_teacher():
    refusal_world = world.WorldConfig.from_sizes(1, 1, 2, 2, response_length=4,
                                                 horizon=2)
    teacher = world.TeacherPolicy(refusal_world)
    V_world = refusal_world.vocab_size
    policy = TabularPolicy.random(jax.random.key(0), V_world, 4, scale=0.0)
    tokens = world.sample_teacher(jax.random.key(1), refusal_world, 512)
    before = training.per_position_cross_entropy(policy, teacher, tokens)
    entropy = training.per_position_cross_entropy(teacher, teacher, tokens)

    config = training.default_pretrain_config()
    config.steps = 150
    config.batch_size = 64
    config.learning_rate = 0.1
    config.log_every = 50
    config.eval_batch_size = 256
    fitted = training.pretrain(
        jax.random.key(2), policy,
        lambda key, num: world.sample_teacher(key, refusal_world, num), config,
        teacher_policy=teacher)
    after = training.pretrain_report(fitted, teacher, tokens)
    assert before.shape == (4,)
    np.testing.assert_allclose(after["teacher_entropy"], entropy, rtol=1e-6)
    np.testing.assert_allclose(after["excess"],
                               after["cross_entropy"] - after["teacher_entropy"])
    # The excess is a mean KL, so it is non-negative up to rounding.
    assert np.all(after["excess"] >= -1e-5)
    excess_before = float((before - entropy).sum())
    excess_after = float(after["excess"].sum())
    assert excess_after < 0.1 * excess_before, (excess_before, excess_after)


def test_pretrain_from_array_in_epochs():
    policy = TabularPolicy.random(jax.random.key(0), V, T, scale=0.0)
    # Every response is (1, 2, 0), so the fit should put its mass there.
    data = np.tile(np.array([[1, 2, 0]]), (10, 1))
    config = training.default_pretrain_config()
    config.steps = 30
    config.batch_size = 4
    config.learning_rate = 0.2
    fitted = training.pretrain(jax.random.key(0), policy, data, config)
    log_prob = float(fitted.sequence_log_prob(jnp.asarray(data[:1]))[0])
    assert log_prob > np.log(0.9)


def test_per_position_cross_entropy_matches_numpy():
    policy = TabularPolicy.random(jax.random.key(0), V, T)
    teacher = TabularPolicy.random(jax.random.key(1), V, T)
    tokens = jax.random.randint(jax.random.key(2), (5, T), 0, V)
    cross_entropy = training.per_position_cross_entropy(policy, teacher, tokens)
    p = np.exp(np.asarray(teacher.log_probs(tokens), np.float64))
    log_q = np.asarray(policy.log_probs(tokens), np.float64)
    np.testing.assert_allclose(cross_entropy, (-p * log_q).sum(-1).mean(0), rtol=1e-5)


# Run directory: metrics, checkpoints, resume --------------------------------------


def test_metrics_file_lines(tmp_path):
    policy, harm, q = tabular_problem()
    training.align(None, policy, policy, harm, small_config(steps=5, mu=1.0, gamma=0.7),
                   str(tmp_path), q_prefixes=q, recovery_ids=RECOVERY_IDS,
                   eval_fn=exact_eval(harm))
    lines = read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4, 5]
    assert set(lines[0]) == {"step", "eval/exact_harm", "eval/root_probs"}
    evaluated = [line["step"] for line in lines if "eval/exact_harm" in line]
    # Step 0, every eval_every = 2 updates, and the last update.
    assert evaluated == [0, 2, 4, 5]
    for line in lines[1:]:
        for name in ("harm", "kl", "recovery", "total", "grad_norm"):
            assert isinstance(line[name], float), name
        assert len(line["kl_per_position"]) == T
        assert len(line["recovery_per_position"]) == T
    assert len(lines[2]["eval/root_probs"]) == V
    checkpoints = sorted(os.listdir(tmp_path / training.CHECKPOINT_DIR))
    assert checkpoints == ["3", "5"]


class StopRun(Exception):
    """Raised by an evaluation callback to interrupt a run."""


def test_resume_equals_uninterrupted(tmp_path):
    policy, harm, q = tabular_problem()
    config = small_config(mu=1.0, gamma=0.7, q_batch_size=4)
    eval_fn = exact_eval(harm)
    kwargs = dict(q_prefixes=q, recovery_ids=RECOVERY_IDS)

    reference = training.align(jax.random.key(7), policy, policy, harm, config,
                               str(tmp_path / "reference"), eval_fn=eval_fn, **kwargs)

    def failing_eval(step, p):
        if step == 6:
            raise StopRun("stopped on purpose")
        return eval_fn(step, p)

    interrupted = str(tmp_path / "interrupted")
    with pytest.raises(StopRun):
        training.align(jax.random.key(7), policy, policy, harm, config, interrupted,
                       eval_fn=failing_eval, **kwargs)
    # Lines up to step 5 were written; the last checkpoint is step 3.
    assert [line["step"] for line in read_metrics(interrupted)] == [0, 1, 2, 3, 4, 5]
    assert sorted(os.listdir(os.path.join(interrupted, training.CHECKPOINT_DIR))) == ["3"]

    # A line cut short by the interruption is dropped on resume.
    with open(os.path.join(interrupted, training.METRICS_FILE), "a") as f:
        f.write('{"step": 6, "harm": 0.2')
    # The initial policy passed on resume is ignored in favour of the checkpoint.
    other_start = policy.replace_params(policy.params + 1.0)
    resumed = training.align(jax.random.key(7), other_start, policy, harm, config,
                             interrupted, eval_fn=eval_fn, **kwargs)
    np.testing.assert_array_equal(resumed.params, reference.params)
    with open(os.path.join(interrupted, training.METRICS_FILE)) as f:
        resumed_text = f.read()
    with open(tmp_path / "reference" / training.METRICS_FILE) as f:
        assert resumed_text == f.read()


def test_extending_steps_equals_longer_run(tmp_path):
    policy, harm, _ = tabular_problem()
    reference = training.align(None, policy, policy, harm, small_config(steps=6),
                               str(tmp_path / "reference"))
    short = str(tmp_path / "short")
    training.align(None, policy, policy, harm, small_config(steps=4), short)
    extended = training.align(None, policy, policy, harm, small_config(steps=6), short)
    np.testing.assert_array_equal(extended.params, reference.params)
    assert read_metrics(short) == read_metrics(tmp_path / "reference")

    # A complete run returns its last checkpoint and writes nothing.
    again = training.align(None, policy, policy, harm, small_config(steps=6), short)
    np.testing.assert_array_equal(again.params, reference.params)
    assert len(read_metrics(short)) == 6


@pytest.mark.parametrize("change,field", [
    ("vocab", "model.vocab_size"),
    ("lam", "training.lam"),
    ("base", "base_model.params_sha256"),
    ("key", "training.key"),
])
def test_mismatched_run_config_raises(change, field, tmp_path):
    policy, harm, _ = tabular_problem()
    training.align(jax.random.key(0), policy, policy, harm, small_config(steps=3),
                   str(tmp_path))
    key, config, base = jax.random.key(0), small_config(steps=6), policy
    if change == "vocab":
        policy = TabularPolicy.random(jax.random.key(1), V + 1, T)
        base = policy
        harm = TableHarm(jnp.zeros((V + 1,) * T))
    elif change == "lam":
        config.lam = 3.0
    elif change == "base":
        base = policy.replace_params(policy.params * 2.0)
    else:
        key = jax.random.key(1)
    with pytest.raises(ValueError, match=rf"differing fields: .*{re.escape(field)}: "):
        training.align(key, policy, base, harm, config, str(tmp_path))


# NaN guard ------------------------------------------------------------------------


def test_nan_harm_stops_at_first_step(tmp_path):
    policy, _, _ = tabular_problem()
    harm = Harm(lambda tokens: jnp.full(tokens.shape[:1], jnp.nan), name="nan harm")
    with pytest.raises(FloatingPointError,
                       match=r"not finite at step 1: harm=nan.*no checkpoint was saved"):
        training.align(None, policy, policy, harm, small_config(), str(tmp_path))
    assert read_metrics(tmp_path) == []


@jax.tree_util.register_pytree_node_class
class FragilePolicy(TabularPolicy):
    """A tabular policy whose logits turn NaN once the root logit of token 0 exceeds 1."""

    def logits(self, tokens):
        logits = super().logits(tokens)
        return jnp.where(self.table[0, 0] > 1.0, jnp.nan, logits)

    def replace_params(self, params):
        return FragilePolicy(params, self.vocab_size, self.response_length)


def test_nan_loss_names_step_and_last_checkpoint(tmp_path):
    policy = FragilePolicy(jnp.zeros((13, V)), V, T)
    base = TabularPolicy(jnp.zeros((13, V)), V, T)
    # Harm 1 unless y_0 = 0, so the update raises the root logit of token 0.
    harm = TableHarm((jnp.arange(V) != 0).astype(jnp.float32)[:, None, None]
                     * jnp.ones((V,) * T))
    config = small_config(steps=20, batch_size=32, learning_rate=0.4, max_grad_norm=0.0,
                          lam=10.0, checkpoint_every=2)
    with pytest.raises(FloatingPointError) as error:
        training.align(None, policy, base, harm, config, str(tmp_path))
    last_good = read_metrics(tmp_path)[-1]["step"]
    last_checkpoint = last_good - last_good % 2
    assert last_checkpoint >= 2
    message = str(error.value)
    assert f"not finite at step {last_good + 1}:" in message
    assert "total=nan" in message
    assert f"the last good checkpoint is step {last_checkpoint} in" in message
    checkpoints = sorted(int(name) for name in
                         os.listdir(tmp_path / training.CHECKPOINT_DIR))
    assert checkpoints[-1] == last_checkpoint


# Transformer ----------------------------------------------------------------------


def tiny_transformer(refusal_world, width=16):
    config = TransformerConfig(vocab_size=refusal_world.vocab_size,
                               response_length=refusal_world.response_length,
                               width=width, depth=1, num_heads=2, mlp_ratio=2)
    return TransformerPolicy.init(jax.random.key(0), config)


def zero_transformer(refusal_world, width):
    """A transformer with zero parameters, built without compiling its initialiser."""
    config = TransformerConfig(vocab_size=refusal_world.vocab_size,
                               response_length=refusal_world.response_length,
                               width=width, depth=1, num_heads=2, mlp_ratio=2)
    shapes = jax.eval_shape(lambda key: TransformerPolicy.init(key, config),
                            jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes.params)
    return TransformerPolicy(params, config)


def test_transformer_align_and_config_check(tmp_path):
    refusal_world = world.WorldConfig.from_sizes(1, 1, 2, 2, response_length=4, horizon=2)
    base = tiny_transformer(refusal_world)
    harm = world.training_harm(refusal_world)
    q = world.sample_q_prefixes(jax.random.key(3), refusal_world, 8, 3)
    config = small_config(steps=2, mu=1.0, gamma=0.9, learning_rate=1e-2)
    workdir = str(tmp_path / "run")
    aligned = training.align(jax.random.key(4), base, base, harm, config, workdir,
                             q_prefixes=q, recovery_ids=refusal_world.groups.refusal)
    lines = read_metrics(workdir)
    assert [line["step"] for line in lines] == [1, 2]
    assert all(np.isfinite(line["total"]) for line in lines)
    assert len(lines[0]["recovery_per_position"]) == 4
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()),
                                           aligned.params, base.params))
    assert any(changed)

    wider = zero_transformer(refusal_world, width=32)
    with pytest.raises(ValueError, match="model.config.width: 16 in the run directory, "
                                         "32 now"):
        training.align(jax.random.key(4), wider, base, harm, config, workdir,
                       q_prefixes=q, recovery_ids=refusal_world.groups.refusal)


@pytest.mark.slow
def test_transformer_pretrain_fits_teacher():
    refusal_world = world.WorldConfig.from_sizes(1, 1, 2, 2, response_length=4, horizon=2)
    policy = tiny_transformer(refusal_world)
    teacher = world.TeacherPolicy(refusal_world)
    data = world.sample_teacher(jax.random.key(1), refusal_world, 1024)
    config = training.default_pretrain_config()
    config.steps = 300
    config.batch_size = 64
    config.learning_rate = 1e-2
    config.eval_batch_size = 256
    fitted = training.pretrain(jax.random.key(2), policy, data, config,
                               teacher_policy=teacher)
    entropy = training.per_position_cross_entropy(teacher, teacher, data)
    before = training.per_position_cross_entropy(policy, teacher, data)
    after = training.per_position_cross_entropy(fitted, teacher, data)
    excess_before = float((before - entropy).sum())
    excess_after = float((after - entropy).sum())
    assert excess_after < 0.2 * excess_before, (excess_before, excess_after)


# A real process killed with SIGKILL -----------------------------------------------


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    import jax
    sys.path.insert(0, {tests!r})
    from test_training import tabular_problem, small_config, RECOVERY_IDS
    from hi_jax import training

    policy, harm, q = tabular_problem()

    def slow_eval(step, p):
        time.sleep(0.2)
        return {{}}

    training.align(jax.random.key(5), policy, policy, harm,
                   small_config(steps=40, checkpoint_every=5, mu=1.0, gamma=0.7),
                   {workdir!r}, q_prefixes=q, recovery_ids=RECOVERY_IDS,
                   eval_fn=slow_eval)
""")


def test_resume_after_sigkill(tmp_path):
    policy, harm, q = tabular_problem()
    config = small_config(steps=40, checkpoint_every=5, mu=1.0, gamma=0.7)
    kwargs = dict(q_prefixes=q, recovery_ids=RECOVERY_IDS, eval_fn=lambda step, p: {})
    reference = training.align(jax.random.key(5), policy, policy, harm, config,
                               str(tmp_path / "reference"), **kwargs)

    workdir = str(tmp_path / "killed")
    script = _KILLED_RUN.format(tests=os.path.dirname(__file__), workdir=workdir)
    process = subprocess.Popen([sys.executable, "-c", script],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint_dir = os.path.join(workdir, training.CHECKPOINT_DIR)
    # Generous: the subprocess compiles the update before its first step.
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            steps = [name for name in os.listdir(checkpoint_dir) if name.isdigit()] \
                if os.path.isdir(checkpoint_dir) else []
            if any(int(name) >= 10 for name in steps):
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint at step >= 10 within 300 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(read_metrics(workdir)) < 41

    resumed = training.align(jax.random.key(5), policy, policy, harm, config, workdir,
                             **kwargs)
    np.testing.assert_array_equal(resumed.params, reference.params)
    assert read_metrics(workdir) == read_metrics(tmp_path / "reference")
