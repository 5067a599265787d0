"""Smoke test of the input pipeline benchmark (bench/data.py, issue 7 item 4) on its --quick
settings: one modality, in-process and with one grain worker. The figures mean nothing at this
size; the test checks that every one is there and positive. Compiling the step takes most of it.
"""

import math

from bench import data


def test_quick_run_reports_positive_rates_for_every_worker_count():
  args = data.parse_args(["--quick", "--modalities=image", "--workers=0,1", "--version=1"])
  (job,) = data.make_jobs(args)
  result = data.run_modality(job)

  rows = data.table_rows([result])
  assert [(r["config"], r["workers"]) for r in rows] == [("image-tiny-v1", 0), ("image-tiny-v1", 1)]
  for r in rows:
    for field in ("batches_per_s", "records_per_s", "units_per_s", "step_batches_per_s", "ratio"):
      assert math.isfinite(r[field]) and r[field] > 0, (field, r)
    assert r["records_per_s"] == r["units_per_s"]  # an image is a record
    assert r["unit"] == "images/s"
  for p in result["pipelines"]:
    assert len(p["windows"]) == data.QUICK["windows"]
    assert all(w["batches"] >= data.QUICK["batches"] for w in p["windows"])
  (shape,) = result["step"]["shapes"].values()  # one batch shape: one compiled step
  assert shape["loss_finite"] and shape["step_s"] > 0

  table = data.format_table(rows).splitlines()
  assert len(table) == 2 + len(rows)  # header, separator, one line per row
  assert table[2].startswith("| image-tiny-v1 | 64 | 0 |")
  assert table[3].startswith("| image-tiny-v1 | 64 | 1 |")
  assert "image-tiny-v1" in data.format_details([result])
