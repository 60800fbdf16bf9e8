r"""Data tools.

    ddpm-jax-data prepare --source=folder --path=DIR --out=OUT \
        [--image_size=32] [--channels=3] [--labels_from_folders] [--eval_fraction=0.05] \
        [--encoding=raw|png] [--workers=N] [--overwrite]
    ddpm-jax-data prepare --source=huggingface --path=SAVED_DIR|hf://NAME --out=OUT \
        [--image_key=image] [--label_key=label|none] ...

`prepare` decodes every image of the source once, centre-crops and resizes it to
--image_size with --channels (exactly as training on the source would), and writes each
split into ArrayRecord files under OUT; train on them with
`--config.data.source=arrayrecord --config.data.path=OUT` (and the same image_size and
channels). A file that cannot be decoded stops it, naming the file. Errors are one line,
`error: ...`, with exit status 2.
"""

from __future__ import annotations

import sys

from absl import flags

from ddpm_jax import cli, errors

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, ["folder", "huggingface"], "What to read.")
flags.DEFINE_string("path", None, "The folder, the save_to_disk directory, or hf://NAME.")
flags.DEFINE_string("out", None, "The directory to write (must not exist, or be empty).")
flags.DEFINE_integer("image_size", 32, "Height = width of the stored images, in pixels.")
flags.DEFINE_integer("channels", 3, "Channels of the stored images (1 grey, 3 RGB).")
flags.DEFINE_bool("labels_from_folders", False, "folder: labels from first-level sub-folders.")
flags.DEFINE_float("eval_fraction", 0.0, "Fraction held out as split 'test' (by path hash).")
flags.DEFINE_string("image_key", "image", "huggingface: the image column.")
flags.DEFINE_string("label_key", "label", "huggingface: the label column ('none': unlabelled).")
flags.DEFINE_string("data_dir", None, "huggingface with hf://NAME: the datasets cache.")
flags.DEFINE_enum("encoding", "raw", ["raw", "png"], "raw: uint8 pixels (fastest); png: smaller.")
flags.DEFINE_integer("workers", None, "Decoding processes (default: one per CPU; 0: none).")
flags.DEFINE_bool("overwrite", False, "Replace an earlier prepared dataset at --out.")
_COMMANDS = ("prepare",)


def _as_flags(error: errors.UserError) -> str:
    """A message about `config.data.<field>` as one about the flag `--<field>`."""
    return errors.one_line(error).replace("config.data.", "--")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in _COMMANDS:
        cli.fail(f"expected one command, one of {list(_COMMANDS)}; got {argv[1:]}.")
    for name in ("source", "path", "out"):
        if FLAGS[name].value is None:
            cli.fail(f"--{name} is required.")
    from ddpm_jax.data import prepare
    from ddpm_jax.data.config import DataConfig
    from ddpm_jax.experiment import defaults
    from ddpm_jax.files import resolve_path

    label_key = None if FLAGS.label_key.lower() in ("none", "") else FLAGS.label_key
    try:
        data = DataConfig.from_dict(defaults.group(
            "data",
            name="prepare",
            source=FLAGS.source,
            path=resolve_path(FLAGS.path),
            image_size=FLAGS.image_size,
            channels=FLAGS.channels,
            labels_from_folders=FLAGS.labels_from_folders,
            eval_fraction=FLAGS.eval_fraction,
            image_key=FLAGS.image_key,
            label_key=label_key,
            data_dir=resolve_path(FLAGS.data_dir),
        ))  # fmt: skip
        out = resolve_path(FLAGS.out)
        info = prepare.prepare(
            data, out, encoding=FLAGS.encoding, workers=FLAGS.workers, overwrite=FLAGS.overwrite
        )
    except errors.UserError as e:
        if FLAGS.verbose:
            raise
        cli.fail(_as_flags(e))
    counts = ", ".join(f"{k} {v['num_examples']:,}" for k, v in info["splits"].items())
    print(f"wrote {out}: {counts} images of {info['image_size']}x{info['image_size']}x"
          f"{info['channels']} ({info['encoding']}), {info['num_classes']} classes")  # fmt: skip
    print(f"train with --config.data.source=arrayrecord --config.data.path={out} "
          f"--config.data.image_size={info['image_size']} "
          f"--config.data.channels={info['channels']}")  # fmt: skip


def run() -> None:
    """The `ddpm-jax-data` console script (also `python -m ddpm_jax.data`)."""
    cli.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
