"""One jitted training step (forward + backward + SGD) of an MLP: fbp vs JAX's autodiff.

Workload: MLP 784-1024-1024-1024-10, ReLU, softmax cross-entropy from logits, batch 256,
float32. The peer is ``jax.value_and_grad`` of an idiomatic pure-jnp model with the same
initial parameters. Run: ``python benchmarks/bench_mlp.py [--rounds N]``.
"""

import argparse

import jax
import jax.numpy as jnp
from common import interleaved, report, temp_bytes

import fbp
from fbp import losses, nn

SIZES = (784, 1024, 1024, 1024, 10)
BATCH = 256
LR = 1e-2


def fbp_step_fn():
    layers = []
    for width in SIZES[1:-1]:
        layers += [nn.Dense(width, kernel_init=nn.init.he_normal), nn.ReLU()]
    model = nn.Serial(*layers, nn.Dense(SIZES[-1]))
    vg = fbp.value_and_grad(model, losses.CategoricalCrossEntropy(from_logits=True))

    def step(params, x, y):
        value, grads = vg(params, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), value

    return model, jax.jit(step)


def jax_mlp(params, x):
    *hidden, last = params
    for p in hidden:
        x = jax.nn.relu(x @ p["w"] + p["b"])
    return x @ last["w"] + last["b"]


def jax_loss(params, x, y):
    logits = jax_mlp(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


@jax.jit
def jax_step(params, x, y):
    value, grads = jax.value_and_grad(jax_loss)(params, x, y)
    return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), value


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (BATCH, SIZES[0]))
    y = jax.random.randint(ky, (BATCH,), 0, SIZES[-1])
    model, fbp_step = fbp_step_fn()
    fbp_params = model.init(kp, x)
    jax_params = [p for p in fbp_params if p]  # the same weights, as a list of dense layers

    # the two steps compute the same thing
    (_, v1), (_, v2) = fbp_step(fbp_params, x, y), jax_step(jax_params, x, y)
    assert abs(float(v1) - float(v2)) < 1e-4 * abs(float(v2)), (v1, v2)

    times = interleaved({"jax.value_and_grad": lambda: jax_step(jax_params, x, y),
                         "fbp.value_and_grad": lambda: fbp_step(fbp_params, x, y)}, args.rounds, args.reps)
    memory = {"jax.value_and_grad": temp_bytes(jax_step, jax_params, x, y),
              "fbp.value_and_grad": temp_bytes(fbp_step, fbp_params, x, y)}
    report("MLP 784-1024x3-10, ReLU, softmax CE, batch 256, f32: one jitted SGD step", times, memory,
           baseline="jax.value_and_grad")


if __name__ == "__main__":
    main()
