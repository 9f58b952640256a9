"""The Keras heads, as scikit-learn estimators so they share the one cross-validation path.

`DenseHead` is the classic Flatten-Dense(512)-Dropout-softmax head on pooled features.
`FineTuneHead` fine-tunes the backbone's last stage from the cached maps where it starts (VGG16's
block5 from block4_pool, ResNet's conv5, ...), from the pretrained weights; the head is trained
first with the stage frozen, then both at a small
learning rate. TensorFlow is imported inside `fit`/`predict` only.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from pipeline import views


def _keras() -> Any:
    from pipeline.progress import quiet_frameworks

    quiet_frameworks()
    import keras

    return keras


def epoch_progress(label: str, epochs: int) -> Any:
    """A Keras callback printing epochs done, rate and ETA (early stopping may end sooner)."""
    keras = _keras()
    from pipeline.progress import Progress

    class EpochProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.progress = Progress(epochs, label, unit="epochs")

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.progress.update(1)

    return EpochProgress()


class KerasClassifier(ClassifierMixin, BaseEstimator):
    """Shared mechanics: label encoding, inner early-stopping split, batched predict, pickling.

    `fit(X, y, groups=...)` keeps each group (an image, its views, its identical copies) on one
    side of the early-stopping split, which stops on original images only (views are marked in
    `groups`: `pipeline.views`); metadata routing passes `groups` through a Pipeline.
    """

    __metadata_request__fit = {"groups": True}  # noqa: RUF012 (scikit-learn's convention)

    validation_fraction: float
    random_state: int
    batch_size: int
    patience: int

    def _split(
        self, X: np.ndarray, yi: np.ndarray, groups: np.ndarray | None = None
    ) -> tuple[Any, Any, Any]:
        n_cls = int(yi.max()) + 1
        n_val = int(round(len(yi) * self.validation_fraction))
        if np.bincount(yi).min() < 2 or n_val < n_cls or len(yi) - n_val < n_cls:
            return X, yi, None
        if groups is None:
            fX, vX, fy, vy = train_test_split(
                X, yi, test_size=n_val, stratify=yi, random_state=self.random_state
            )
            return fX, fy, (vX, vy)
        contents = views.content(groups)
        pairs = np.unique(np.stack([yi, contents]), axis=1)
        least = int(np.bincount(pairs[0]).min())  # distinct contents in the smallest class
        k = min(int(round(1 / self.validation_fraction)), least)
        if k < 2:
            return X, yi, None  # too few distinct images to hold some out: no early stopping
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # tiny classes: fewer groups than k
            cv = StratifiedGroupKFold(k, shuffle=True, random_state=self.random_state)
            fit_idx, val_idx = next(cv.split(X, yi, contents))
        orig = views.originals(groups)[val_idx]
        if orig.any():  # stopped on original images only; their views are held out, unused
            val_idx = val_idx[orig]
        return X[fit_idx], yi[fit_idx], (X[val_idx], yi[val_idx])

    def _train(self, model: Any, X: Any, y: Any, val: Any, lr: float, epochs: int) -> int:
        keras = _keras()
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=False,  # XLA ("auto") made these small models 2-3x slower on CPU
        )
        stop = keras.callbacks.EarlyStopping(
            monitor="val_loss" if val is not None else "loss",
            patience=self.patience,
            restore_best_weights=True,
        )
        hist = model.fit(
            X,
            y,
            validation_data=val,
            epochs=epochs,
            batch_size=self.batch_size,
            callbacks=[stop, epoch_progress(f"{type(self).__name__} epochs", epochs)],
            verbose=0,
            shuffle=True,
        )
        return len(hist.history["loss"])

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        keras = _keras()
        X = self._inputs(X)
        out = [
            keras.ops.convert_to_numpy(self.model_(X[i : i + 1024], training=False))
            for i in range(0, len(X), 1024)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes_)), np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __getstate__(self) -> dict[str, Any]:
        # The Keras model travels as `.keras` bytes; `save_head` also writes it as its own file.
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "m.keras"
                model.save(p)
                state["_model_bytes"] = p.read_bytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_model_bytes", None)
        self.__dict__.update(state)
        if blob is not None:
            keras = _keras()
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "m.keras"
                p.write_bytes(blob)
                self.model_ = keras.models.load_model(p)


class DenseHead(KerasClassifier):
    """The classic Keras head: Flatten, Dense(hidden, relu), Dropout, Dense(softmax).

    Adam at `learning_rate`; early stopping on a stratified inner split of the training data
    (`validation_fraction`), restoring the best weights. Seeded by `random_state`.
    """

    def __init__(
        self,
        hidden: int = 512,
        dropout: float = 0.5,
        learning_rate: float = 1e-4,
        epochs: int = 100,
        batch_size: int = 32,
        patience: int = 5,
        validation_fraction: float = 0.15,
        random_state: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> DenseHead:
        keras = _keras()
        self.classes_, yi = np.unique(y, return_inverse=True)
        keras.utils.set_random_seed(self.random_state)
        X = self._inputs(X)
        fX, fy, val = self._split(X, yi, groups)
        model = keras.Sequential(
            [
                keras.Input((X.shape[1],)),
                keras.layers.Flatten(),
                keras.layers.Dense(self.hidden, activation="relu"),
                keras.layers.Dropout(self.dropout, seed=self.random_state),
                keras.layers.Dense(len(self.classes_), activation="softmax"),
            ]
        )
        self.epochs_run_ = self._train(model, fX, fy, val, self.learning_rate, self.epochs)
        self.model_ = model
        return self


class FineTuneHead(KerasClassifier):
    """The backbone's last stage + dense head, trained on the cached maps where that stage starts.

    The stage (VGG's block5, ResNet's conv5, Inception's last two blocks, ConvNeXt's last stage,
    ...) is cut out of the same backbone with the same weights as the cache, so it starts from
    the pretrained values. Phase 1 trains the head with the stage frozen at `head_lr`; phase 2
    unfreezes the stage and trains everything at `finetune_lr`. BatchNormalization layers stay
    frozen (inference mode, moving statistics untouched) throughout: the classic pitfall of
    fine-tuning with few images. Both phases stop early on a group-aware inner split.
    """

    def __init__(
        self,
        backbone: str = "vgg16",
        weights: str = "imagenet",
        start_layer: str = "block4_pool",
        end_layer: str = "block5_pool",
        input_size: int = 224,
        map_shape: tuple[int, ...] = (14, 14, 512),
        hidden: int = 256,
        dropout: float = 0.5,
        head_lr: float = 1e-3,
        finetune_lr: float = 1e-5,
        head_epochs: int = 50,
        finetune_epochs: int = 10,
        batch_size: int = 32,
        patience: int = 5,
        validation_fraction: float = 0.15,
        random_state: int = 0,
        backbone_seed: int = 0,
    ) -> None:
        self.backbone = backbone
        self.weights = weights
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.input_size = input_size
        self.map_shape = map_shape
        self.hidden = hidden
        self.dropout = dropout
        self.head_lr = head_lr
        self.finetune_lr = finetune_lr
        self.head_epochs = head_epochs
        self.finetune_epochs = finetune_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.backbone_seed = backbone_seed

    def _inputs(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=np.float32).reshape((-1,) + tuple(self.map_shape))

    def stage(self) -> Any:
        """The pretrained last stage alone: cached maps in, the backbone's features out."""
        from pipeline.backbone import BackboneSpec, _load_base, cut

        keras = _keras()
        spec = BackboneSpec(
            weights=self.weights,
            name=self.backbone,
            layer=self.end_layer,
            input_size=self.input_size,
            seed=self.backbone_seed,
        )
        base = _load_base(spec)
        stage = keras.Model(cut(base, self.start_layer), cut(base, self.end_layer), name="stage")
        for layer in stage.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # inference mode: moving statistics never updated
        return stage

    def build(self, n_classes: int) -> Any:
        """The model with the stage at its pretrained weights (before any training)."""
        return self._parts(n_classes)[0]

    def _parts(self, n_classes: int) -> tuple[Any, Any, Any]:
        """(full model, the stage alone, head alone), sharing the same layer objects."""
        keras = _keras()
        stage = self.stage()
        inp = keras.Input(tuple(self.map_shape))
        x = stage(inp)
        head_layers = [
            keras.layers.Flatten(),
            keras.layers.Normalization(name="scale"),  # set from the training fold in `fit`
            keras.layers.Dense(self.hidden, activation="relu"),
            keras.layers.Dropout(self.dropout, seed=self.random_state),
            keras.layers.Dense(n_classes, activation="softmax"),
        ]
        z_in = keras.Input(tuple(x.shape[1:]))
        y_full, y_head = x, z_in
        for layer in head_layers:
            y_full, y_head = layer(y_full), layer(y_head)
        full = keras.Model(inp, y_full, name=f"{self.backbone}_stage_finetune")
        head = keras.Model(z_in, y_head, name="head")
        return full, stage, head

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> FineTuneHead:
        keras = _keras()
        self.classes_, yi = np.unique(y, return_inverse=True)
        X = self._inputs(X)
        keras.utils.set_random_seed(self.random_state)
        full, stage, head = self._parts(len(self.classes_))
        fX, fy, val = self._split(X, yi, groups)
        # Phase 1, the stage frozen: its output is fixed, so compute it once, train the head on it
        z = keras.ops.convert_to_numpy(stage.predict(fX, batch_size=64, verbose=0))
        zval = None
        if val is not None:
            zval = (
                keras.ops.convert_to_numpy(stage.predict(val[0], batch_size=64, verbose=0)),
                val[1],
            )
        # Standardise the stage's output with the training fold's statistics (StandardScaler's
        # rule: a constant feature keeps scale 1), as the other heads do inside every fold.
        flat = z.reshape(len(z), -1)
        std = flat.std(axis=0)
        self.stage_mean_ = flat.mean(axis=0)
        full.get_layer("scale").set_weights(
            [flat.mean(axis=0), np.where(std > 0, std, 1.0) ** 2, np.array(len(z))]
        )
        full.get_layer("scale").finalize_state()  # Keras reads the statistics from here on
        self.head_epochs_run_ = self._train(head, z, fy, zval, self.head_lr, self.head_epochs)
        # Phase 2: the stage (BatchNorm still frozen) and the head together, at a small rate
        self.finetune_epochs_run_ = self._train(
            full, fX, fy, val, self.finetune_lr, self.finetune_epochs
        )
        self.model_ = full
        return self
