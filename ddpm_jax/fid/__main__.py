"""FID weight tools.

python -m ddpm_jax.fid convert [SOURCE] --out-dir DIR [--sha256 HEX]
    Fetches SOURCE (path or URL of pytorch-fid's .pth; default: its release URL),
    verifies it, converts it to .npz in DIR (needs torch), and prints the path and SHA-256
    to put in config.eval.inception_weights / config.eval.inception_sha256.
python -m ddpm_jax.fid check FILE [--sha256 HEX]
    Verifies FILE's SHA-256 and, for a .npz, that it loads with every expected key/shape and
    whether it holds the logits layer that the Inception Score needs.
"""

import argparse
import sys

from ddpm_jax import errors
from ddpm_jax.fid import weights
from ddpm_jax.runtime.workdir import resolve_path


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.fid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert pytorch-fid's .pth to .npz (needs torch)")
    convert.add_argument("source", nargs="?", default=weights.PYTORCH_FID_WEIGHTS_URL)
    convert.add_argument("--out-dir", required=True)
    convert.add_argument("--sha256", default=None, help="full SHA-256 of SOURCE, if known")
    check = sub.add_parser("check", help="verify a weights file")
    check.add_argument("file")
    check.add_argument("--sha256", default=None)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError, ImportError) as e:  # a bad file, hash, path or missing torch.
        print(f"error: {errors.one_line(e)}", file=sys.stderr)
        return errors.EXIT_USER_ERROR


def _run(args: argparse.Namespace) -> int:
    # Paths are resolved here, once: the conversion writes where the user pointed.
    if args.command == "convert":
        args.out_dir = resolve_path(args.out_dir)
        if "://" not in args.source:
            args.source = resolve_path(args.source)
    else:
        args.file = resolve_path(args.file)
    if args.command == "convert":
        pth = weights.fetch(args.source, args.out_dir, args.sha256)
        out = weights.convert_torch_checkpoint(pth, args.out_dir)
        print(f"source  {pth}  sha256 {weights.sha256_file(pth)}")
        print(f"wrote   {out}")
        print(f"config.eval.inception_weights = {str(out)!r}")
        print(f"config.eval.inception_sha256 = {weights.sha256_file(out)!r}")
    else:
        print(weights.verify_sha256(args.file, args.sha256))
        if args.file.endswith(".npz"):
            _, logits = weights.load_weights_npz(args.file)
            print("all variables present with the expected shapes")
            if logits:
                print("logits layer present: FID, sFID, IS, precision and recall")
            else:
                print("no logits layer (converted by an older ddpm_jax): FID, sFID, precision and "
                      "recall, but no IS until converted again")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
