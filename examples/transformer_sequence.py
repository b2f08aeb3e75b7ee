"""A small transformer learns to reverse a sequence of digits.

Input: 10 random digits; target at position t: the digit at position 9 - t. Embedding +
learned positions -> 2 pre-LN transformer blocks -> LayerNorm -> Dense(10) per position,
cross-entropy on every token. Every backward rule (attention's softmax included) is fbp's.
Run: ``python examples/transformer_sequence.py``; prints token and sequence accuracy.
"""

import argparse

import jax
import jax.numpy as jnp

from fbp import losses, nn, optim, train

LENGTH, VOCAB = 10, 10


def make_data(key, n):
    x = jax.random.randint(key, (n, LENGTH), 0, VOCAB)
    return x, x[:, ::-1]


def build_model(width=64, heads=4, blocks=2):
    return nn.Serial(nn.Embedding(VOCAB, width, embedding_init=nn.init.normal(0.5)),
                     nn.LearnedPositionalEmbedding(LENGTH, embedding_init=nn.init.normal(0.5)),
                     *[nn.TransformerBlock(heads, 2 * width) for _ in range(blocks)],
                     nn.LayerNorm(), nn.Dense(VOCAB))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    key = jax.random.PRNGKey(args.seed)
    k_train, k_test, k_init, k_fit = jax.random.split(key, 4)
    x_train, y_train = make_data(k_train, args.train_size)
    x_test, y_test = make_data(k_test, 2000)
    model = build_model()
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    steps = args.epochs * (args.train_size // 64)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0),
                            optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 3e-3, 200, steps), weight_decay=1e-4))
    result = train.fit(model, loss, optimizer, model.init(k_init, x_train[:2]), x_train, y_train, key=k_fit,
                       epochs=args.epochs, batch_size=64, scan_epochs=True, progress=not args.no_progress,
                       num_classes=VOCAB)
    pred = jnp.argmax(jax.jit(model.apply)(result.params, x_test), axis=-1)
    token_accuracy = float((pred == y_test).mean())
    sequence_accuracy = float((pred == y_test).all(axis=1).mean())
    print(f"example: {x_test[0].tolist()} -> {pred[0].tolist()}")
    print(f"final training loss: {result.history['loss'][-1]:.4f}")
    print(f"test token accuracy: {token_accuracy:.4f}")
    print(f"test sequence accuracy: {sequence_accuracy:.4f}")
    return token_accuracy


if __name__ == "__main__":
    main()
