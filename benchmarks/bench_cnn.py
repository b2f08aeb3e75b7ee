"""One jitted training step of a small CNN: fbp vs JAX's autodiff of an idiomatic jnp model.

Workload: input 28×28×1, batch 128, Conv 3×3×32 SAME, ReLU, MaxPool 2, Conv 3×3×64 SAME,
ReLU, MaxPool 2, Flatten, Dense 128, ReLU, Dense 10, softmax cross-entropy, SGD, float32.
The peer uses ``lax.conv_general_dilated`` and ``lax.reduce_window`` max pooling (as Flax's
``max_pool``) under ``jax.value_and_grad``. Run: ``python benchmarks/bench_cnn.py``.
"""

import argparse

import jax
import jax.numpy as jnp
from common import interleaved, report, temp_bytes
from jax import lax

import fbp
from fbp import losses, nn

LR = 1e-2
DN = ("NHWC", "HWIO", "NHWC")


def fbp_model():
    return nn.Serial(nn.Conv2D(32, 3), nn.ReLU(), nn.MaxPool2D(2), nn.Conv2D(64, 3), nn.ReLU(), nn.MaxPool2D(2),
                     nn.Flatten(), nn.Dense(128), nn.ReLU(), nn.Dense(10))


def reduce_window_pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def reshape_pool(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def jax_forward(p, x, pool=reduce_window_pool):
    def conv(x, q):
        return lax.conv_general_dilated(x, q["w"], (1, 1), "SAME", dimension_numbers=DN) + q["b"]

    x = pool(jax.nn.relu(conv(x, p[0])))
    x = pool(jax.nn.relu(conv(x, p[3])))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ p[7]["w"] + p[7]["b"])
    return x @ p[9]["w"] + p[9]["b"]


def jax_loss(p, x, y, pool=reduce_window_pool):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(jax_forward(p, x, pool)), y[:, None], axis=1))


def sgd(params, grads):
    return jax.tree_util.tree_map(lambda a, g: a - LR * g, params, grads)


@jax.jit
def jax_step(p, x, y):
    value, grads = jax.value_and_grad(jax_loss)(p, x, y)
    return sgd(p, grads), value


@jax.jit
def jax_reshape_step(p, x, y):
    value, grads = jax.value_and_grad(lambda q: jax_loss(q, x, y, reshape_pool))(p)
    return sgd(p, grads), value


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (128, 28, 28, 1))
    y = jax.random.randint(ky, (128,), 0, 10)
    model = fbp_model()
    params = model.init(kp, x)
    vg = fbp.value_and_grad(model, losses.CategoricalCrossEntropy(from_logits=True))

    @jax.jit
    def fbp_step(p, x, y):
        value, grads = vg(p, x, y)
        return sgd(p, grads), value

    (_, v1), (_, v2) = fbp_step(params, x, y), jax_step(params, x, y)
    assert abs(float(v1) - float(v2)) < 1e-4 * abs(float(v2)), (v1, v2)
    steps = {"jax.value_and_grad": jax_step, "jax (reshape-max pool)": jax_reshape_step, "fbp.value_and_grad": fbp_step}
    times = interleaved({name: (lambda s=s: s(params, x, y)) for name, s in steps.items()}, args.rounds, args.reps)
    memory = {name: temp_bytes(s, params, x, y) for name, s in steps.items()}
    title = "CNN 28x28x1, conv32-pool-conv64-pool-dense128-10, batch 128, f32: one jitted SGD step"
    report(title, times, memory, baseline="jax.value_and_grad")
    print(f"  ratio fbp / jax (reshape-max pool): time "
          f"{times['fbp.value_and_grad'] / times['jax (reshape-max pool)']:.3f}   temp memory "
          f"{memory['fbp.value_and_grad'] / memory['jax (reshape-max pool)']:.3f}")


if __name__ == "__main__":
    main()
