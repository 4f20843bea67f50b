"""The original project's recipe in TF/Keras 2 (tf_keras), re-created from its description, to
time it on the same CPU and images as crystalscope. Run by benchmarks/versus_original.py in a
Python that has tensorflow-cpu and tf_keras (its own virtual environment); not imported.

    python original_keras.py DATA_DIR [--steps 3] [--batch 64] [--predict 32]

DATA_DIR holds one folder per class. Prints two JSON lines: training images/s
(flow_from_directory with the original augmentation; ResNet-101 at 224 px, last 10% of layers
trainable, the two-dropout head, SGD momentum 0.9 lr 0.1) and predict images/s, one file at a
time as the original did. Weights are random: speed does not depend on them, and no hub can be
reached here.
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tf_keras as keras
from tf_keras.applications.resnet import ResNet101, preprocess_input


def build_model() -> tuple[keras.Model, int, int]:
    base = ResNet101(include_top=False, weights=None, input_shape=(224, 224, 3))
    trainable = len(base.layers) // 10
    for layer in base.layers[:-trainable]:
        layer.trainable = False
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dense(512, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.4)(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dropout(0.3)(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(base.input, out)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
                  loss="binary_crossentropy", metrics=["accuracy"])
    return model, len(base.layers), trainable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--predict", type=int, default=32, help="files predicted one by one")
    args = parser.parse_args()
    generator = keras.preprocessing.image.ImageDataGenerator(
        preprocessing_function=preprocess_input, rotation_range=30, width_shift_range=0.2,
        height_shift_range=0.2, zoom_range=0.3, horizontal_flip=True, vertical_flip=True,
        fill_mode="nearest")
    flow = generator.flow_from_directory(str(args.data), target_size=(224, 224),
                                         batch_size=args.batch, class_mode="binary", seed=42)
    model, layers, trainable = build_model()
    model.fit(flow, steps_per_epoch=1, epochs=1, verbose=0)  # warm-up: builds the graph
    start = time.perf_counter()
    model.fit(flow, steps_per_epoch=args.steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"what": "train", "layers": layers, "trainable_layers": trainable,
                      "images": args.steps * args.batch, "seconds": round(seconds, 2),
                      "images_per_s": round(args.steps * args.batch / seconds, 2)}), flush=True)

    files = sorted(args.data.glob("*/*.png"))[:args.predict]

    def load(path: Path) -> np.ndarray:
        image = keras.preprocessing.image.load_img(path, target_size=(224, 224))
        return preprocess_input(np.expand_dims(keras.preprocessing.image.img_to_array(image), 0))

    model.predict(load(files[0]), verbose=0)
    start = time.perf_counter()
    for path in files:
        model.predict(load(path), verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"what": "predict_per_image", "images": len(files),
                      "seconds": round(seconds, 2),
                      "images_per_s": round(len(files) / seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
