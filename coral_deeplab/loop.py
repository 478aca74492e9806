"""One training run's TensorFlow side: the model and its start weights, the optimizer with
DeepLab's polynomial decay, checkpoints, the compiled train step (backbone freezing and
BatchNorm handling), validation, and the loop with its history log and progress line.
:mod:`coral_deeplab.train` prepares the data and the run directory and calls it; TensorFlow is
imported only when a run is created.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segd.fsutil import atomic_write
from segd.progress import Progress

if TYPE_CHECKING:
    from coral_deeplab.train import TrainConfig, TrainResult

__all__ = ["TrainingRun"]


def _is_backbone(layer_name: str) -> bool:
    return layer_name.startswith(("Conv", "expanded_conv"))


def _read_history(path: Path, last_step: int) -> list[str]:
    """Lines of ``history.jsonl`` up to ``last_step``. A line that does not parse (the partial
    last line of a run killed while writing) is dropped: the log is a record, not state."""
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            step = int(entry["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if step <= last_step:
            kept.append(line)
    return kept


class TrainingRun:
    """One training run's model, optimizer, checkpoints and step functions (TensorFlow)."""

    def __init__(self, config: TrainConfig, out: Path, labels: list[str], val_samples: list[Any]) -> None:
        import tensorflow as tf
        import tf_keras as keras

        from coral_deeplab import applications, data, metrics

        self.config, self.out, self.labels = config, out, labels
        self.n_classes = n_classes = len(labels)
        self.crop_hw = config.input_hw()
        self.aligned = True  # 16k+1 inputs: logit i on pixel 16 i (segd.geometry)
        ckpt_dir = out / "checkpoints"

        keras.utils.set_random_seed(config.seed)
        self.builder = (
            applications.CoralDeepLabV3 if config.architecture == "v3" else applications.CoralDeepLabV3Plus
        )
        self.model = model = self.builder((*self.crop_hw, 3), alpha=float(config.alpha), n_classes=n_classes, weights=None)
        # Resuming, every weight comes from the checkpoint: the start weights are not needed.
        restoring = config.resume and tf.train.latest_checkpoint(str(ckpt_dir)) is not None
        self._load_start_weights(None if restoring else config.weights)

        self.schedule = keras.optimizers.schedules.PolynomialDecay(
            config.lr(), decay_steps=config.steps, end_learning_rate=0.0, power=0.9
        )
        self.optimizer: Any = (
            keras.optimizers.Adam(self.schedule)
            if config.optimizer == "adam"
            else keras.optimizers.SGD(self.schedule, momentum=0.9)
        )
        self.optimizer.build([v for v in model.variables if v.trainable])
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=self.optimizer, step=self.step_var)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(ckpt_dir), max_to_keep=config.keep_checkpoints)
        if config.resume and self.manager.latest_checkpoint:
            self.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        self.start_step = int(self.step_var.numpy())

        self.train_bn = config.batchnorm_trains()
        self.bn_layers = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
        aligned = self.aligned

        @tf.function
        def predict(images: tf.Tensor) -> tf.Tensor:
            logits = model(images, training=False)
            return metrics.predict_labels(logits, tf.shape(images)[1:3], align_corners=aligned)

        self.predict = predict
        self.val_ds = (
            data.eval_dataset(val_samples, self.crop_hw, config.batch_size, n_classes=n_classes)
            if val_samples
            else None
        )

    def _load_start_weights(self, weights: str | None) -> None:
        config = self.config
        if weights == "pascal_voc":
            from coral_deeplab.weights import load_pascal_voc

            load_pascal_voc(
                self.model, alpha=float(config.alpha),
                skip_logits=self.n_classes != 21 or config.architecture != "v3",
                models_dir=Path(config.source_models_dir) if config.source_models_dir else None,
                mirror=config.mirror,
                cache=Path(config.weights_cache) if config.weights_cache else None,
            )  # fmt: skip
        elif weights is not None:
            self.model.load_weights(os.fspath(weights))

    def configure(self, backbone_frozen: bool) -> list[Any]:
        """Set layer trainability; return the variables the optimizer updates."""
        model, train_bn = self.model, self.train_bn
        for layer in model.layers:
            layer.trainable = not (backbone_frozen and _is_backbone(layer.name))
        for layer in self.bn_layers:
            if not (backbone_frozen and _is_backbone(layer.name)):
                layer.trainable = train_bn
        var_list = list(model.trainable_variables)
        if not train_bn:  # statistics frozen (inference-mode BN), scale/offset still train
            for layer in self.bn_layers:
                if not (backbone_frozen and _is_backbone(layer.name)):
                    var_list += [layer.gamma, layer.beta]
        return var_list

    def make_step(self, var_list: list[Any]) -> Any:
        """A compiled training step over ``var_list``: (cross-entropy, total loss, confusion)."""
        import tensorflow as tf

        from coral_deeplab import losses, metrics

        model, optimizer, step_var = self.model, self.optimizer, self.step_var
        n_classes, aligned = self.n_classes, self.aligned

        @tf.function
        def step(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                ce = losses.masked_cross_entropy(targets, logits, align_corners=aligned)
                total = ce + tf.add_n(model.losses) if model.losses else ce
            grads = tape.gradient(total, var_list)
            optimizer.apply_gradients(zip(grads, var_list, strict=True))
            step_var.assign_add(1)
            pred = metrics.predict_labels(logits, tf.shape(targets)[1:3], align_corners=aligned)
            return ce, total, metrics.batch_confusion(targets, pred, n_classes)

        return step

    def validate(self) -> tuple[float, list[float | None]] | None:
        """Validation mIoU and per-class IoU (None: no validation samples)."""
        import numpy as np

        from coral_deeplab import metrics

        if self.val_ds is None:
            return None
        n = self.n_classes
        cm = np.zeros((n, n), np.int64)
        for images, targets in self.val_ds:
            cm += metrics.batch_confusion(targets, self.predict(images), n).numpy()
        iou = metrics.iou_per_class(cm)
        return metrics.mean_iou(cm), [None if math.isnan(x) else float(x) for x in iou]

    def loop(self, result: TrainResult, train_samples: list[Any], *, progress: bool) -> None:
        """Steps ``start_step .. steps`` (or ``stop_at``): history, evaluations, checkpoints."""
        import numpy as np
        import tensorflow as tf

        from coral_deeplab import data, metrics

        config, n_classes, start_step = self.config, self.n_classes, self.start_step
        history_path = self.out / "history.jsonl"
        history = _read_history(history_path, start_step) if config.resume and history_path.is_file() else []
        # Rewritten atomically, then appended to: a crash leaves the old log or the new one.
        atomic_write(history_path, "".join(line + "\n" for line in history))
        history_file = history_path.open("a")

        def log(entry: dict[str, Any]) -> None:
            history_file.write(json.dumps(entry) + "\n")
            history_file.flush()

        bar = Progress(config.name, unit="steps", total=config.steps, done=start_step, show=progress)

        def record_eval(step: int) -> None:
            got = self.validate()
            if got is None:
                return
            miou, per_class = got
            result.evals.append((step, miou, per_class))
            log({"step": step, "val_miou": miou, "val_iou": per_class})
            shown = ", ".join(f"{n} {'n/a' if v is None else f'{v:.3f}'}" for n, v in zip(self.labels, per_class, strict=True))
            bar.write(f"step {step}: val mIoU {miou:.4f} ({shown})")

        try:
            if config.eval_before and start_step < config.steps:
                record_eval(start_step)
            stream = iter(
                data.train_dataset(
                    train_samples, self.crop_hw, config.batch_size, n_classes=n_classes,
                    augment=data.Augment(config.min_scale, config.max_scale, config.scale_step, config.flip),
                    seed=config.seed, start_step=start_step,
                )
            )  # fmt: skip
            frozen: bool | None = None
            step_fn: Any = None
            window_cm = np.zeros((n_classes, n_classes), np.int64)
            window_loss: list[float] = []
            end = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
            for step in range(start_step, end):
                want_frozen = config.freeze_backbone == -1 or step < config.freeze_backbone
                if want_frozen != frozen:
                    frozen = want_frozen
                    step_fn = self.make_step(self.configure(frozen))
                images, targets = next(stream)
                ce, total, cm = step_fn(images, targets)
                ce_value = float(ce.numpy())
                result.losses.append((step + 1, ce_value))
                window_loss.append(ce_value)
                window_cm += cm.numpy()
                train_miou = metrics.mean_iou(window_cm)
                bar.step(loss=f"{np.mean(window_loss):.4f}", miou=f"{train_miou:.3f}")
                done = step + 1
                if done % 10 == 0 or done == config.steps:
                    lr = float(self.schedule(done - 1))
                    log({"step": done, "loss": float(np.mean(window_loss)), "total_loss": float(total.numpy()),
                         "train_miou": train_miou, "lr": lr})  # fmt: skip
                    window_loss, window_cm = [], np.zeros_like(window_cm)
                if config.checkpoint_every and done % config.checkpoint_every == 0:
                    self.manager.save(checkpoint_number=done)
                if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                    record_eval(done)
            if end < config.steps:
                result.stopped = True
                if int(self.step_var.numpy()) > start_step:
                    self.manager.save(checkpoint_number=end)
            elif start_step < config.steps:
                self.manager.save(checkpoint_number=config.steps)
                record_eval(config.steps)
        except tf.errors.OpError as exc:
            # A bad sample met inside the tf.data pipeline: report it like the up-front checks.
            err = data.dataset_error(exc)
            if err is None:
                raise
            raise err from None
        finally:
            bar.close()
            history_file.close()
