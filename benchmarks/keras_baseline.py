"""The chapter's own Keras baseline, for side-by-side accuracy and speed (benchmark only).

Runs in a separate environment with tensorflow-cpu (never a cnnlab dependency):

    python3 -m venv runs/tfvenv && runs/tfvenv/bin/pip install tensorflow-cpu==2.21.0
    .venv/bin/python benchmarks/export_npz.py runs/cifar10.npz      # the same decoded pixels
    runs/tfvenv/bin/python benchmarks/keras_baseline.py runs/cifar10.npz --epochs 5

Prints one JSON line per epoch: seconds, loss, accuracy, val_loss, val_accuracy.
"""

import argparse
import json
import time

import numpy as np
from tensorflow import keras


def model() -> keras.Model:
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(6, (5, 5), padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.MaxPooling2D((2, 2), strides=(2, 2), padding="same"),
        keras.layers.Dropout(0.2),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ])


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        print(json.dumps({"epoch": epoch + 1, "seconds": round(time.perf_counter() - self.start, 3),
                          **{k: round(float(v), 4) for k, v in (logs or {}).items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("npz")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=None)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    data = np.load(args.npz)
    # (N, C, H, W) uint8 -> (N, H, W, C) float32 / 255, as the chapter does.
    x_train = data["train_x"].transpose(0, 2, 3, 1).astype("float32") / 255
    x_test = data["test_x"].transpose(0, 2, 3, 1).astype("float32") / 255
    y_train = keras.utils.to_categorical(data["train_y"], 10)
    y_test = keras.utils.to_categorical(data["test_y"], 10)
    if args.subset:
        x_train, y_train = x_train[:args.subset], y_train[:args.subset]
    net = model()
    net.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3),
                loss="categorical_crossentropy", metrics=["accuracy"])
    net.fit(x_train, y_train, batch_size=32, epochs=args.epochs, validation_data=(x_test, y_test),
            verbose=0, callbacks=[EpochTimer()])


if __name__ == "__main__":
    main()
