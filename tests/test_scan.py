"""misalign.scan: the streamed pass equals the same quantities computed on the whole ledger in memory.

The ledger is rewritten with small row groups that split images across groups, so every tally has to
add up across batches; the references are numpy's histogram2d and plain masks over all rows.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from misalign import counts
from misalign.compare import compare, json_safe
from misalign.ledger import read_ledger
from misalign.metrics import STREAMED_ANALYSIS_COLUMNS, analyze
from misalign.scan import HIST_BINS, read_scanned
from misalign.synthetic import synthetic_ledger


@pytest.fixture(scope="module")
def small_groups(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan") / "dump"
    gt = synthetic_ledger(folder, num_images=30, cands_per_image=150, seed=5, with_obj=True, alpha=0.5)
    path = folder / "candidates.parquet"
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=997)  # 150 rows an image: groups end mid-image
    assert pq.ParquetFile(path).num_row_groups == -(-table.num_rows // 997) > 4
    return folder, gt


@pytest.mark.parametrize("batch_rows", [1, 5000, 1 << 21])  # every row group alone, some gathered, all at once
def test_tallies_and_retained_rows_equal_whole_ledger_references(small_groups, monkeypatch, batch_rows):
    import misalign.scan

    monkeypatch.setattr(misalign.scan, "BATCH_ROWS", batch_rows)
    folder, _ = small_groups
    shown = np.array([3, 17], np.int64)
    ledger, scan = read_scanned(folder, STREAMED_ANALYSIS_COLUMNS, retain_iou=0.5, shown_ids=shown)
    full = read_ledger(folder, STREAMED_ANALYSIS_COLUMNS).candidates
    assert scan.num_rows == len(full)

    pd_counts = counts.per_image_counts(read_ledger(folder, STREAMED_ANALYSIS_COLUMNS))
    assert counts.per_image_counts(ledger, scan.counts).equals(pd_counts)

    edges = np.linspace(0, 1, HIST_BINS + 1)
    for column in ("cls_score", "obj_score", "score"):
        for stage, rows in (("pre_nms", np.ones(len(full), bool)), ("post_nms", full["kept"].to_numpy())):
            x, y = full[column].to_numpy()[rows], full["iou"].to_numpy()[rows]
            expected, _, _ = np.histogram2d(np.minimum(x, 1), y, bins=[edges, edges])
            np.testing.assert_array_equal(scan.histograms[column][stage], expected)
            high, good = x > np.float32(0.5), y > np.float32(0.5)
            name = column.replace("_score", "")
            assert scan.quadrants[column][stage] == {
                f"iou>0.5 & {name}>0.5": int((good & high).sum()), f"iou>0.5 & {name}<=0.5": int((good & ~high).sum()),
                f"iou<=0.5 & {name}>0.5": int((~good & high).sum()), f"iou<=0.5 & {name}<=0.5": int((~good & ~high).sum())}

    keep = (full["iou"].to_numpy() >= 0.5) | full["kept"].to_numpy() | np.isin(full["image_id"].to_numpy(), shown)
    assert 0 < keep.sum() < len(full)
    assert scan.retained.reset_index(drop=True).equals(full[keep].reset_index(drop=True))
    assert scan.has_obj and not scan.score_is_cls and not scan.score_above_one


def test_streamed_report_metrics_equal_the_in_memory_analysis(small_groups):
    folder, gt = small_groups
    from misalign.calibration import obj_vs_iou as obj_vs_iou_of
    from misalign.levels import per_level
    from misalign.suppression import per_gt_table, suppression_metrics

    streamed = compare([folder], gt, before_after_nms=True, bootstrap=30).metrics["detectors"]["dump"]
    full = read_ledger(folder)
    in_memory = json_safe(analyze(full, gt, name="dump", bootstrap=30).metrics)
    # the suppression losses from the retained rows only, against every row of the ledger
    assert streamed.pop("suppression") == json_safe(suppression_metrics(per_gt_table(full.candidates)))
    assert streamed.pop("per_level") == json_safe(per_level(full.candidates, full.meta))
    obj_vs_iou, _ = obj_vs_iou_of(full.candidates["obj_score"].to_numpy(), full.candidates["iou"].to_numpy())
    assert streamed.pop("obj_vs_iou") == json_safe(obj_vs_iou)
    for key in ("errors", "nms_counterfactual", "calibration"):  # of the kept rows, read apart from the scan
        streamed.pop(key)
    assert streamed == in_memory
    assert streamed["counts"]["pre_nms"]["iou>0.5"] > streamed["counts"]["post_nms"]["iou>0.5"] > 0


@pytest.mark.parametrize("column,value", [("iou", 1.5), ("suppressed_by", 10**9), ("image_id", 99999)])
def test_the_report_checks_rows_in_its_scan_as_validate_ledger_does(tmp_path, column, value):
    """A bad row in the fourth row group: the report's one-line error is validate_ledger's, row numbered in
    the whole file; nothing of the report is written."""
    from misalign.errors import InputError
    from misalign.ledger import validate_ledger
    from reports import write_report

    folder = tmp_path / "dump"
    gt = synthetic_ledger(folder, num_images=10, cands_per_image=100, seed=2)
    path = folder / "candidates.parquet"
    frame = pq.read_table(path).to_pandas()
    frame.loc[3 * 250 + 7, column] = value
    pq.write_table(pa.Table.from_pandas(frame, schema=pq.read_schema(path), preserve_index=False), path,
                   row_group_size=250)
    with pytest.raises(InputError) as expected:
        validate_ledger(folder)
    assert "row 757" in str(expected.value)
    with pytest.raises(InputError) as got:
        write_report([folder], tmp_path / "report", gt=str(gt))
    assert str(got.value) == str(expected.value)
    assert not (tmp_path / "report").exists()
