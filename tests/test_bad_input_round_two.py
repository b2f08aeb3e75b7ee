"""Trust, round two (issue 26): each case that gave a silent wrong answer or a traceback naming
nothing of ours now raises an error that names the argument (or layer and path) and what is
accepted. One test per case, named after it; the generated sweep over every public constructor
is in test_sweep.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import augment, credit, curvature, data, kfac, losses, nn, optim, parallel, precision, telemetry, train
from fbp.core import InputError

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MODEL = nn.Serial(nn.Dense(4), nn.Tanh(), nn.Dense(3))
X = jnp.ones((5, 3))
Y = jnp.arange(5) % 3
PARAMS = MODEL.init(jax.random.PRNGKey(0), X)


# --------------------------------------------------------------------------- absurd values accepted silently
@pytest.mark.parametrize("make, error, match", [
    (lambda: kfac.kfac(MODEL, CCE, optim.sgd(0.1), damping=math.inf), ValueError, r"damping must be a finite number"),
    (lambda: kfac.kfac(MODEL, CCE, optim.sgd(0.1), damping="0.1"), TypeError, "damping must be a number, got str"),
    (lambda: precision.loss_scaled(optim.sgd(0.1), math.inf), ValueError, r"init_scale must be a finite number in \(0"),
    (lambda: precision.loss_scaled(optim.sgd(0.1), "big"), TypeError, "init_scale must be a number, got str"),
    (lambda: nn.ScaleGradient(1e39), ValueError, r"factor must be a finite number in \[-3.4"),
    (lambda: nn.LayerNorm(epsilon=0), ValueError, r"LayerNorm: epsilon must be a finite number in \(0.0"),
    (lambda: nn.GroupNorm(2, epsilon=0), ValueError, r"GroupNorm: epsilon must be a finite number in \(0.0"),
    (lambda: nn.GroupNorm(2, epsilon=-1e-5), ValueError, "GroupNorm: epsilon"),
    (lambda: nn.QuantizeWeights(nn.Dense(3), keys="wb"), TypeError, "read letter by letter"),
    (lambda: telemetry.value_grad_and_stats(MODEL, CCE, alignment="no"), TypeError, "alignment must be True or False"),
    (lambda: list(data.batches(np.ones((5, 2)), np.ones(4), 2)), ValueError, "x has 5 examples and y 4"),
    (lambda: data.batch_indices(-5, 2), ValueError, "n must be the number of examples, an int >= 0, got -5"),
    (lambda: data.batch_indices(10.5, 2), TypeError, "n must be an int, got float 10.5"),
], ids=["kfac-damping-inf", "kfac-damping-text", "loss-scaled-inf", "loss-scaled-text", "scale-gradient-overflow",
        "layernorm-eps-zero", "groupnorm-eps-zero", "groupnorm-eps-negative", "quantize-keys-string",
        "alignment-truthy-string", "batches-lengths-differ", "batch-indices-negative", "batch-indices-fraction"])
def test_absurd_values_are_refused_with_the_accepted_range(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_policy_whose_params_dtype_differs_from_the_params_is_refused():
    step = train.make_step(MODEL, CCE, optim.sgd(0.1), precision=precision.Policy(params=jnp.float16))
    with pytest.raises(InputError, match=r"keeps params in float16, but the parameter '0/b' is \(4,\) float32"):
        step(PARAMS, optim.sgd(0.1).init(PARAMS), X, Y)


# --------------------------------------------------------------------------- tracebacks that name nothing of ours
@pytest.mark.parametrize("layer", [nn.SimpleRNN(3), nn.GRU(3), nn.LSTM(3), nn.MultiHeadAttention(2), nn.LastStep()],
                         ids=lambda layer: type(layer).__name__)
def test_zero_length_sequences_are_refused(layer):
    x = jnp.ones((2, 0, 4))
    with pytest.raises(InputError, match=r"sequence of length 0, \(2, 0, 4\) float32"):
        layer.apply(layer.init(jax.random.PRNGKey(0), jnp.ones((2, 1, 4))), x)


def test_a_sequence_loss_over_zero_steps_is_refused():
    with pytest.raises(InputError, match=r"\(2, 0, 3\) float32 has no entries"):
        CCE(jnp.ones((2, 0, 3)), jnp.zeros((2, 0), jnp.int32))


@pytest.mark.parametrize("vector, match", [
    (lambda p: {"a": jnp.ones(1)}, r"missing \['0/b'"),
    (lambda p: jax.tree_util.tree_map(lambda a: jnp.ones(a.shape + (1,)), p), r"at '0/b' expected \(4,\) float32"),
    (lambda p: jax.tree_util.tree_map(lambda a: jnp.ones(a.shape, jnp.int32), p), "must be floating like params"),
    (lambda p: list(p), "other containers"),
], ids=["structure", "shapes", "dtype", "container"])
def test_ggn_vector_product_names_a_vector_unlike_params(vector, match):
    with pytest.raises(InputError, match=match):
        curvature.ggn_vector_product(MODEL, CCE)(PARAMS, X, Y, vector(PARAMS))


def test_seeds_augmentations_and_meshes_of_the_wrong_kind_are_named():
    with pytest.raises(TypeError, match="feedback_alignment: seed must be an int, got str 'abc'"):
        credit.feedback_alignment(MODEL, seed="abc")
    with pytest.raises(TypeError, match="direct_feedback_alignment: seed must be an int"):
        credit.direct_feedback_alignment(MODEL, X, seed=1.5)
    with pytest.raises(InputError, match=r"x must be floating; got \(2, 3\) int32"):
        augment.gaussian_noise(0.1)(jax.random.PRNGKey(0), jnp.ones((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="horizontal_flip: probability must be a number, got str"):
        augment.horizontal_flip("0.5")
    with pytest.raises(TypeError, match="random_crop: padding must be an int, got str '2'"):
        augment.random_crop("2")
    with pytest.raises(TypeError, match="make_step: mesh must be a 1-D jax.sharding.Mesh.*got str 'data'"):
        train.make_step(MODEL, CCE, optim.sgd(0.1), mesh="data")
    with pytest.raises(TypeError, match=r"Policy.parse: expected text such as 'bfloat16'.*got int 3"):
        precision.Policy.parse(3)
    with pytest.raises(ValueError, match="compute='bfloat17' in 'bfloat17' is not a dtype"):
        precision.Policy.parse("bfloat17")
    with pytest.raises(ValueError, match="'compute' is given twice"):
        precision.Policy.parse("compute=bfloat16,compute=float16")


def test_a_donated_step_called_again_with_the_same_buffers_says_what_was_donated():
    opt = optim.sgd(0.1)
    step = train.make_step(MODEL, CCE, opt, mesh=parallel.data_mesh(1))
    params = jax.tree_util.tree_map(jnp.copy, PARAMS)
    state = opt.init(params)
    step(params, state, X, Y)
    with pytest.raises(ValueError, match=r"the params passed in were donated to an earlier call.*jnp.copy"):
        step(params, state, X, Y)


def test_telemetry_on_an_empty_batch_is_refused():
    with pytest.raises(InputError, match=r"at least one example; received x \(0, 3\) float32"):
        telemetry.value_grad_and_stats(MODEL, CCE)(PARAMS, jnp.ones((0, 3)), jnp.zeros((0,), jnp.int32))


def test_direct_feedback_alignment_with_another_models_state_names_what_it_expects():
    dfa = credit.direct_feedback_alignment(MODEL, X)
    params = dfa.init(jax.random.PRNGKey(0), X)
    other = {"layers": dfa.init_state(params)["layers"], "feedback": {"9": jnp.ones((3, 4))}}
    with pytest.raises(InputError, match=r"expects feedback matrices \{'2': \(3, 4\)\}.*received \{'9': \(3, 4\)\}"):
        dfa.apply(params, X, state=other)


def test_the_kfac_error_for_a_stateful_model_gives_runnable_advice():
    with pytest.raises(InputError, match=r"does not train models that keep state.*\['1'\].*LayerNorm or GroupNorm") \
            as err:
        kfac.kfac(nn.Serial(nn.Dense(4), nn.BatchNorm(), nn.Dense(3)), CCE, optim.sgd(0.1))
    assert "has_state=True" not in str(err.value)


def test_an_error_about_a_large_model_names_it_in_a_line_not_a_kilobyte_repr():
    big = nn.Serial(*[nn.Dense(8) for _ in range(40)])
    with pytest.raises(InputError) as err:
        telemetry.value_grad_and_stats(big, CCE, alignment=True)
    assert len(str(err.value)) < 400 and str(err.value).startswith("Serial(Dense(features=8)")
