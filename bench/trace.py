"""Where a traced step's time goes (issue 7 item 3): XLA ops of a `jax.profiler` trace by time.

    python main.py --config=configs/image.py --workdir=/tmp/prof --config.probe.enabled=False \
        --config.loop.total_steps=6 --config.loop.profile_first_step=4 --config.loop.profile_steps=2
    .venv/bin/python -m bench.trace /tmp/prof/profile --top=25
    # with the op -> source mapping: dump the optimised HLO while training
    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$" \
        python main.py ...   # as above
    .venv/bin/python -m bench.trace /tmp/prof/profile --hlo_dir=/tmp/hlo [--by_source]

Reads the newest `*.xplane.pb` under the directory (what `config.loop.profile_first_step`
writes, see d2v_jax/loop.py), sums the duration of every event that names an HLO op (`hlo_op`
stat: XLA's CPU and GPU runtimes record one per executed op or fusion) per (module, op), and
prints the top ones with their share of all op time. With `--hlo_dir`, each op is followed by the
JAX source of its root instruction (the `op_name` metadata of the dumped `*after_optimizations*`
HLO text, e.g. `jit(step)/.../attention/dot_general`), which says which layer it belongs to;
`--by_source` sums the time per source with the block numbers folded, one row per kind of op.
"""

import argparse
import collections
import pathlib
import re
import warnings


def newest_trace(directory: pathlib.Path) -> pathlib.Path:
  traces = sorted(directory.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise SystemExit(f"No *.xplane.pb under {directory}: was the run traced?")
  return traces[-1]


def op_times(trace: pathlib.Path) -> tuple[dict, dict]:
  """({(module, op): total ns}, {(module, op): count}) over every plane and line."""
  from jax._src.lib import _profile_data

  total, count = collections.Counter(), collections.Counter()
  warnings.filterwarnings("ignore", "builtin type event_stats", DeprecationWarning)
  for plane in _profile_data.ProfileData.from_file(str(trace)).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          key = (stats.get("hlo_module", "?"), stats["hlo_op"])
          total[key] += event.duration_ns
          count[key] += 1
  return total, count


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", re.M)
_CALLS = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?calls=%([\w.\-]+)", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*?\{\n(.*?)^\}", re.M | re.S)
_ROOT = re.compile(r"ROOT %?[\w.\-]+ = .*?op_name=\"([^\"]+)\"")


def op_sources(hlo_dir: pathlib.Path) -> dict:
  """{(module, instruction): op_name metadata} from the optimised HLO dumps
  (`module_NNNN.<module>.<backend>_after_optimizations.txt`). A fusion's own line has no
  metadata, so it takes its fused computation's ROOT instruction's (`calls=%fused_...`)."""
  sources = {}
  for path in hlo_dir.glob("module_*.*_after_optimizations.txt"):
    module = path.name.split(".")[1]
    text = path.read_text()
    names = dict(_INSTRUCTION.findall(text))
    for block in _COMPUTATION.finditer(text):
      root = _ROOT.search(block.group(2))
      if root:
        names.setdefault(block.group(1), root.group(1))
    for name, called in _CALLS.findall(text):
      if name not in names and called in names:
        names[name] = names[called]
    sources.update({(module, name): source for name, source in names.items()})
  return sources


def layer_pattern(source: str) -> str:
  """The source with block numbers folded (`layer_03` -> `layer_*`): one row per kind of op."""
  return re.sub(r"layer_\d+", "layer_*", source)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("directory", type=pathlib.Path, help="the profile directory (or any parent)")
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--hlo_dir", type=pathlib.Path, default=None, help="XLA's --xla_dump_to folder")
  p.add_argument(
    "--by_source", action="store_true", help="with --hlo_dir: sum over blocks per JAX source"
  )
  args = p.parse_args(argv)
  trace = newest_trace(args.directory)
  total, count = op_times(trace)
  if not total:
    raise SystemExit(f"{trace} holds no HLO op events")
  sources = op_sources(args.hlo_dir) if args.hlo_dir else {}
  all_ns = sum(total.values())
  print(f"trace: {trace}")
  print(f"XLA op time: {all_ns / 1e6:.1f} ms in {sum(count.values())} op events")
  if args.by_source:
    if not sources:
      raise SystemExit("--by_source needs --hlo_dir with the run's optimised HLO dumps")
    grouped = collections.Counter()
    for key, ns in total.items():
      grouped[layer_pattern(sources.get(key, f"{key[0]} / {key[1]} (no source)"))] += ns
    print(f"{'ms':>9} {'share':>6}  JAX source (blocks folded)")
    for source, ns in grouped.most_common(args.top):
      print(f"{ns / 1e6:9.1f} {ns / all_ns:6.1%}  {source}")
    return
  print(f"{'ms':>9} {'share':>6} {'events':>6}  module / op")
  for key, ns in total.most_common(args.top):
    print(f"{ns / 1e6:9.1f} {ns / all_ns:6.1%} {count[key]:6d}  {key[0]} / {key[1]}")
    if key in sources:
      print(f"{'':24}  <- {sources[key]}")


if __name__ == "__main__":
  main()
