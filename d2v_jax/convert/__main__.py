"""Command line of the converters (issue 6; README "Converting checkpoints").

    python -m d2v_jax.convert import SRC OUT_DIR   # HF directory or fairseq/BEiT .pt -> work dir
    python -m d2v_jax.convert export WORKDIR OUT_DIR  # our run's newest student -> HF directory
                                                     # (data2vec 2.0: fairseq's checkpoint.pt)

`import` writes an orbax checkpoint with our config (`d2v_jax.convert.workdir`), ready for
feature extraction, fine-tuning (`--config.init.pretrained=OUT_DIR`) or resumed pretraining.
`export` writes `config.json` + `model.safetensors` that `Data2Vec*Model.from_pretrained` loads.
Errors (a key that does not map, an unsupported option, a pickle with code in it) are printed
without a traceback, and nothing is written in their case.
"""

import argparse
import json
import sys

from d2v_jax import checkpoint
from d2v_jax.convert import common, workdir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m d2v_jax.convert", description=__doc__.split("\n")[0]
  )
  commands = parser.add_subparsers(dest="command", required=True)
  to_ours = commands.add_parser("import", help="HF directory or fairseq/BEiT .pt -> work directory")
  to_ours.add_argument("src", help="HF model directory (config.json + weights) or a .pt file")
  to_ours.add_argument("out_dir", help="new work directory")
  to_ours.add_argument("--seed", type=int, default=0, help="init of what the source lacks")
  to_hf = commands.add_parser("export", help="our work directory -> HF model directory")
  to_hf.add_argument("workdir", help="a run's work directory, its checkpoints/ or one step")
  to_hf.add_argument("out_dir", help="HF model directory to write")
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      report = workdir.import_checkpoint(args.src, args.out_dir, seed=args.seed)
      print(workdir.describe(report, args.out_dir))
    else:
      config = workdir.export_checkpoint(args.workdir, args.out_dir)
      print(f"Wrote {args.out_dir}: {config['architectures'][0]}")
      sizes = ("hidden_size", "num_hidden_layers", "embed_dim", "depth")
      print(json.dumps({k: config[k] for k in sizes if k in config}))
  except (
    common.ConversionError,
    checkpoint.CheckpointError,
    FileNotFoundError,
    FileExistsError,
    ValueError,
  ) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
