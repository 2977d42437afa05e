"""Classify image files with a run: `python -m cnn_lab.predict --workdir=W [--checkpoint=best]
[--average=raw] [--top_k=5] [--json=out.json] IMAGE_OR_DIR...`.

Each image is preprocessed as evaluation preprocesses the run's data (`preprocess_image`):
the shorter side resized to image_size / eval_crop_fraction (bilinear, antialiased), the
centre square cropped, channels converted (grey <-> RGB, alpha dropped), then normalised.
Directories are read recursively; files that cannot be read are listed with the reason.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_lab import checkpoint, command_line, saved_run
from cnn_lab.data import augment, streaming

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
BATCH_SIZE = 32  # Images per forward pass (the last batch is padded: one compilation).


def image_files(paths: list[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """The files named by `paths`, directories expanded recursively to their images (sorted),
    and {path: why it cannot be read} for paths that do not exist."""
    files, problems = [], {}
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            problems[str(path)] = "no such file or directory"
    return files, problems


def decode(path: Path) -> np.ndarray:
    """The pixels (H, W, C) uint8 of an image file; ValueError saying why it cannot be decoded."""
    tf = streaming.tensorflow()
    try:
        return tf.io.decode_image(path.read_bytes(), expand_animations=False).numpy()
    except (OSError, tf.errors.OpError) as error:
        reason = (getattr(error, "message", None) or str(error)).split("}}")[-1]  # TF's op name
        raise ValueError(f"cannot be decoded as an image ({reason.strip()[:120]})") from None


def preprocess_image(image: np.ndarray, data_config: ml_collections.ConfigDict) -> np.ndarray:
    """A decoded image (H, W) or (H, W, C) uint8, as the run's evaluation sees it:
    (image_size, image_size, channels) float32, resized, centre-cropped and normalised."""
    tf = streaming.tensorflow()
    image = tf.convert_to_tensor(image if image.ndim == 3 else image[..., None])
    if image.shape[-1] == 4:  # RGBA: the colours, as decoders for RGB models read them.
        image = image[..., :3]
    if data_config.channels == 1 and image.shape[-1] == 3:
        image = tf.image.rgb_to_grayscale(image)
    elif data_config.channels == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    size = data_config.image_size
    resize_to = round(size / data_config.eval_crop_fraction)
    pixels = streaming.resize_and_crop(image, size, resize_to).numpy()  # As streaming eval.
    normalised = augment.eval_preprocess(
        pixels[None], mean=tuple(data_config.mean), std=tuple(data_config.std)
    )
    return np.asarray(normalised[0])


def predict_files(
    workdir: str | Path,
    paths: list[str | Path],
    *,
    checkpoint_name: str = "best",
    average: str = "raw",
    top_k: int = 5,
) -> list[dict]:
    """For each image under `paths`: {"file", "top_k": [{"class", "label", "probability"},
    ...] most probable first}, or {"file", "error": why it could not be read}."""
    run = saved_run.open_run(workdir)
    variables, _ = run.restore(checkpoint_name, average)
    names = list(run.config.data.class_names)
    files, problems = image_files(paths)
    results, images = [], {}
    for path in files:
        try:
            images[str(path)] = preprocess_image(decode(path), run.config.data)
        except ValueError as error:
            problems[str(path)] = str(error)

    @jax.jit
    def probabilities(variables, batch: jax.Array) -> jax.Array:  # (B, H, W, C) -> (B, K)
        return jax.nn.softmax(run.model.apply(variables, batch, train=False).astype(jnp.float32))

    keys = list(images)
    for start in range(0, len(keys), BATCH_SIZE):
        chunk = np.stack([images[k] for k in keys[start : start + BATCH_SIZE]])
        padded = np.zeros((BATCH_SIZE, *chunk.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        batch_probabilities = np.asarray(probabilities(variables, padded))[: len(chunk)]
        for key, p in zip(keys[start : start + BATCH_SIZE], batch_probabilities, strict=True):
            best = np.argsort(-p, kind="stable")[:top_k]
            top = [{"class": names[k], "label": int(k), "probability": float(p[k])} for k in best]
            results.append({"file": key, "top_k": top})
    return results + [{"file": f, "error": why} for f, why in problems.items()]


def main() -> None:
    """Command line: --workdir, --checkpoint, --average, --top_k, --json, then images or folders."""
    from absl import app, flags

    workdir = flags.DEFINE_string(
        "workdir", None, "The run (or imported weights) to classify with."
    )
    which = flags.DEFINE_string("checkpoint", "best", "best | latest | a step | snapshot:<step>.")
    average = flags.DEFINE_string("average", "raw", "raw, or a kept average (ema, polyak).")
    top_k = flags.DEFINE_integer("top_k", 5, "Classes listed per image.", lower_bound=1)
    json_path = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
    flags.mark_flags_as_required(["workdir"])

    def run(argv: list[str]) -> None:
        try:
            if not argv[1:]:
                raise ValueError("No image given: pass image files or folders after the flags.")
            results = predict_files(
                workdir.value,
                argv[1:],
                checkpoint_name=which.value,
                average=average.value,
                top_k=top_k.value,
            )
            if not any("top_k" in r for r in results):
                failures = "; ".join(f"{r['file']}: {r['error']}" for r in results)
                raise ValueError(f"No image could be read ({failures}).")
        except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as error:
            command_line.report(error)
        for r in results:
            if "top_k" in r:
                top = ", ".join(f"{c['class']} {c['probability']:.3f}" for c in r["top_k"])
                print(f"{r['file']}: {top}")
        for r in results:
            if "error" in r:
                print(f"{r['file']}: not classified: {r['error']}")
        if json_path.value:
            Path(json_path.value).write_text(json.dumps(results, indent=2) + "\n")

    app.run(run, flags_parser=command_line.parse_flags)
