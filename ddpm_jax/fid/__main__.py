r"""FID weight tools: `ddpm-jax-fid` (also `python -m ddpm_jax.fid`).

    ddpm-jax-fid convert [SOURCE] --out_dir=DIR [--sha256=HEX]
        Fetches SOURCE (path or URL of pytorch-fid's .pth; default: its release URL),
        verifies it, converts it to .npz in DIR (needs torch), and prints the path and SHA-256
        to put in config.eval.inception_weights / config.eval.inception_sha256.
    ddpm-jax-fid check FILE [--sha256=HEX]
        Verifies FILE's SHA-256 and, for a .npz, that it loads with every expected key/shape
        and whether it holds the logits layer that the Inception Score needs.

A file, hash or download that cannot be used, or a missing torch, is reported as one line,
`error: ...`, with exit status 2 (`--verbose`: the traceback).
"""

from __future__ import annotations

import os
import sys

from absl import flags

from ddpm_jax import cli, files

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "convert: the directory to write the .npz to.")
flags.DEFINE_string("sha256", None, "The full SHA-256 of the source (convert) or FILE (check).")

_USAGE = "usage: ddpm-jax-fid convert [SOURCE] --out_dir=DIR, or ddpm-jax-fid check FILE"


def main(argv: list[str]) -> None:
    from ddpm_jax.fid import download, weights

    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if command == "convert" and len(args) <= 1:
        if not FLAGS.out_dir:
            cli.fail(f"--out_dir is required; {_USAGE}.")
        # Paths are resolved here, once: the conversion writes where the user pointed.
        out_dir = files.resolve_path(FLAGS.out_dir)
        source = args[0] if args else download.PYTORCH_FID_WEIGHTS_URL
        if "://" not in source:
            source = files.resolve_path(source)
        pth = download.fetch(source, out_dir, FLAGS.sha256)
        out = weights.convert_torch_checkpoint(pth, out_dir)
        print(f"source  {pth}  sha256 {files.sha256_file(pth)}")
        print(f"wrote   {out}")
        print(f"config.eval.inception_weights = {str(out)!r}")
        print(f"config.eval.inception_sha256 = {files.sha256_file(out)!r}")
    elif command == "check" and len(args) == 1:
        path = files.resolve_path(args[0])
        if not os.path.isfile(path):
            cli.fail(f"{path}: no such file.")
        print(download.verify_sha256(path, FLAGS.sha256))
        if path.endswith(".npz"):
            _, logits = weights.load_weights_npz(path)
            print("all variables present with the expected shapes")
            if logits:
                print("logits layer present: FID, sFID, IS, precision and recall")
            else:
                print("no logits layer (converted by an older ddpm_jax): FID, sFID, precision "
                      "and recall, but no IS until converted again")  # fmt: skip
    else:
        cli.fail(f"unexpected arguments {argv[1:]}; {_USAGE}.")


def run() -> None:
    """The `ddpm-jax-fid` console script (also `python -m ddpm_jax.fid`)."""
    cli.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
