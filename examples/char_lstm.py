"""A character-level LSTM language model on public-domain text shipped in ``examples/data``.

Embedding -> LSTM -> Dense over the vocabulary at every step; cross-entropy on the next
character. Backpropagation through time is fbp's hand-written reverse scan. Prints the loss
falling in bits per character (fit records and shows nats, the natural-log unit; one bit is
ln 2 ≈ 0.693 nats, and the script says both once) and text sampled from the model. Run:
``python examples/char_lstm.py``.
"""

import argparse
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fbp import losses, nn, optim, train

TEXT = pathlib.Path(__file__).parent / "data" / "public_domain.txt"
WINDOW = 64


def load(path=TEXT):
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return text, chars, np.array([index[c] for c in text], np.int32)


def windows(ids, stride):
    starts = np.arange(0, len(ids) - WINDOW - 1, stride)
    x = np.stack([ids[s:s + WINDOW] for s in starts])
    y = np.stack([ids[s + 1:s + WINDOW + 1] for s in starts])
    return x, y


def sample(model, params, chars, prompt, length, key, temperature=0.8):
    """Generate ``length`` characters after ``prompt``, feeding the last WINDOW characters each time."""
    index = {c: i for i, c in enumerate(chars)}
    ids = [index[c] for c in prompt]
    logits_at = jax.jit(lambda p, x: model.apply(p, x)[0, -1])
    for k in jax.random.split(key, length):
        context = ([0] * WINDOW + ids)[-WINDOW:]
        logits = logits_at(params, jnp.array([context]))
        ids.append(int(jax.random.categorical(k, logits / temperature)))
    return "".join(chars[i] for i in ids)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stride", type=int, default=16, help="characters between training windows")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    text, chars, ids = load()
    x, y = windows(ids, stride=args.stride)
    print(f"text: {len(text)} characters, vocabulary {len(chars)}, {len(x)} windows of {WINDOW}")
    model = nn.Serial(nn.Embedding(len(chars), 64, embedding_init=nn.init.normal(0.3)), nn.LSTM(args.hidden),
                      nn.Dense(len(chars)))
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    key = jax.random.PRNGKey(args.seed)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(3e-3))
    result = train.fit(model, loss, optimizer, model.init(key, x[:1]), x, y, key=jax.random.fold_in(key, 1),
                       epochs=args.epochs, batch_size=32, scan_epochs=True, progress=not args.no_progress)
    bits = result.history["loss"] / math.log(2)  # fit records nats (natural log); one bit is ln 2 nats
    print(f"last epoch {result.history['loss'][-1]:.3f} nats/char (the unit of fit's history and progress bar) = "
          f"{bits[-1]:.3f} bits/char")
    print("training loss (bits/char) by epoch: " + " ".join(f"{b:.2f}" for b in bits[:: max(1, len(bits) // 10)]))
    print(f"first epoch {bits[0]:.2f} bits/char -> last epoch {bits[-1]:.2f} bits/char "
          f"(uniform over the vocabulary: {math.log2(len(chars)):.2f})")
    for n, prompt in enumerate(("We hold these truths", "Four score and", "Shall I compare thee")):
        # a key per prompt: with one shared key, the same random draws make the samples converge
        print("\nsample:", sample(model, result.params, chars, prompt, 160, jax.random.fold_in(key, 2 + n)))
    return bits


if __name__ == "__main__":
    main()
