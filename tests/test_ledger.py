"""misalign.ledger: the streaming writer, the schemas on disk, reading and validation."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from misalign.errors import InputError
from misalign.ledger import (CANDIDATE_SCHEMA, IMAGE_SCHEMA, RAW_COUNT_SCHEMA, RAW_SCHEMA, SCHEMA_VERSION,
                             LedgerWriter, read_candidates, read_ledger, read_raw, validate_ledger)
from misalign.truth import raw_counts_rows


def image_frame(image_id, rows):
    """Candidates of one image: rows = [(x1, y1, x2, y2, category, score, kept, local suppressed_by)]."""
    arr = np.array(rows, dtype=np.float64)
    return pd.DataFrame({
        "image_id": image_id, "category_id": arr[:, 4].astype(int),
        "x1": arr[:, 0], "y1": arr[:, 1], "x2": arr[:, 2], "y2": arr[:, 3],
        "cls_score": arr[:, 5], "score": arr[:, 5], "kept": arr[:, 6].astype(bool),
        "suppressed_by": arr[:, 7].astype(int), "iou": 0.5, "gt_id": 3, "iou_any": 0.75,
    })


IMAGE_1 = [(0, 0, 10, 10, 1, 0.9, 1, -1), (1, 1, 11, 11, 1, 0.8, 0, 0), (50, 50, 60, 60, 2, 0.7, 1, -1),
           (0.5, 0, 10, 10, 1, 0.3, 0, 0)]
IMAGE_2 = [(5, 5, 25, 35, 1, 0.2, 1, -1), (5, 5, 25, 36, 1, 0.6, 1, -1), (5, 6, 25, 35, 1, 0.1, 0, 1),
           (70, 70, 80, 80, 3, 0.05, 0, -1)]  # the last one: cut by max-detections


def write_toy(folder, raw=False):
    with LedgerWriter(folder) as writer:
        writer.add_images(pd.DataFrame({"image_id": [1, 2], "file_name": ["a.jpg", "b.jpg"], "width": [640, 480],
                                        "height": [480, 640], "num_gt": [1, 2]}))
        first = writer.add_candidates(image_frame(1, IMAGE_1))
        second = writer.add_candidates(pd.concat([image_frame(2, IMAGE_2)]))
        writer.add_raw_counts(raw_counts_rows(1, np.array([0.1, 0.7], np.float32), np.array([0.55, 0.2], np.float32),
                                              np.array([0.6, 0.1], np.float32)))
        if raw:
            writer.add_raw(pd.DataFrame({"image_id": [1, 1], "anchor_idx": [0, 1], "x1": [0.0, 1], "y1": [0.0, 1],
                                         "x2": [5.0, 6], "y2": [5.0, 6], "category_id": [1, 2],
                                         "cls_score": [0.1, 0.7], "iou": [0.0, 0.2], "gt_id": [-1, 3],
                                         "iou_any": [0.55, 0.2]}))
        meta = writer.close({"detector": {"name": "toy", "config": None}, "dataset": {"ann": None}})
    return first, second, meta


def test_writer_round_trip(tmp_path):
    first, second, meta = write_toy(tmp_path / "d", raw=True)
    folder = tmp_path / "d"
    np.testing.assert_array_equal(first, [0, 1, 2, 3])
    np.testing.assert_array_equal(second, [4, 5, 6, 7])
    for name, schema in (("candidates", CANDIDATE_SCHEMA), ("images", IMAGE_SCHEMA),
                         ("raw_counts", RAW_COUNT_SCHEMA), ("raw", RAW_SCHEMA)):
        assert pq.read_schema(folder / f"{name}.parquet").remove_metadata() == schema
    assert pq.ParquetFile(folder / "candidates.parquet").num_row_groups == 2  # one per append
    cands = read_candidates(folder)
    # local positions became global cand_ids: image 2's row 2 points to its row 1 = cand 5
    np.testing.assert_array_equal(cands["suppressed_by"], [-1, 0, -1, 0, -1, -1, 5, -1])
    assert cands["obj_score"].isna().all() and (cands["level"] == -1).all() and (cands["anchor_idx"] == -1).all()
    assert cands["x1"].dtype == np.float64 and cands["level"].dtype == np.int8 and cands["kept"].dtype == bool
    # corners given: w, h are x2 - x1, y2 - y1; the optional columns get their defaults
    np.testing.assert_array_equal(cands["w"], [10, 10, 10, 9.5, 20, 20, 20, 10])
    np.testing.assert_array_equal(cands["h"], [10, 10, 10, 10, 30, 31, 29, 10])
    assert not cands["crowd"].any() and cands["cl_nms_score"].isna().all()
    images = read_ledger(folder).images
    assert (images["num_anchors"] == -1).all() and images["file_name"].tolist() == ["a.jpg", "b.jpg"]
    raw = read_raw(folder)
    assert raw["anchor_x1"].isna().all() and raw["level"].tolist() == [-1, -1]
    assert meta["schema_version"] == SCHEMA_VERSION and meta["num_candidates"] == 8 and meta["num_kept"] == 4
    assert json.loads((folder / "meta.json").read_text())["detector"]["name"] == "toy"
    assert meta["pre_nms"] is True
    dets = json.loads((folder / "detections.json").read_text())
    # kept rows, per image by score descending, boxes as [x, y, w, h]
    assert [(d["image_id"], d["category_id"]) for d in dets] == [(1, 1), (1, 2), (2, 1), (2, 1)]
    assert [d["score"] for d in dets] == [float(np.float32(s)) for s in (0.9, 0.7, 0.6, 0.2)]
    assert dets[2]["bbox"] == [5.0, 5.0, 20.0, 31.0]
    validate_ledger(folder)


def test_writer_empty_ledger_and_no_raw(tmp_path):
    with LedgerWriter(tmp_path) as writer:
        writer.close({})
    for name, schema in (("candidates", CANDIDATE_SCHEMA), ("images", IMAGE_SCHEMA), ("raw_counts", RAW_COUNT_SCHEMA)):
        assert pq.read_table(tmp_path / f"{name}.parquet").schema.remove_metadata() == schema
    assert read_raw(tmp_path) is None
    assert json.loads((tmp_path / "detections.json").read_text()) == []
    validate_ledger(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns=["iou"]), "missing column(s) iou"),
    (lambda f: f.assign(cand_id=0), "assigns cand_id"),
    (lambda f: f.assign(suppressed_by=[-1, 4, -1, 0]), "suppressed_by must be -1 or a row position"),
    (lambda f: f.assign(image_id=[1, 2, 1, 2]), "contiguous"),
    (lambda f: f.assign(level=300), "outside int8"),
    (lambda f: f.assign(gt_id=0.5), "must hold integers"),
])
def test_writer_refuses_bad_frames(tmp_path, change, message):
    with LedgerWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            writer.add_candidates(change(image_frame(1, IMAGE_1)))


def test_writer_refuses_an_image_twice(tmp_path):
    with LedgerWriter(tmp_path) as writer:
        writer.add_candidates(image_frame(1, IMAGE_1))
        with pytest.raises(ValueError, match="one call"):
            writer.add_candidates(image_frame(1, IMAGE_1))


def rewrite(path, transform):
    """Rewrite a Parquet file with `transform(table) -> table`."""
    table = pq.read_table(path)
    pq.write_table(transform(table), path)


def set_column(name, values, type_=None):
    def transform(table):
        i = table.schema.get_field_index(name)
        return table.set_column(i, name, pa.array(values, type=type_ or table.schema.field(name).type))
    return transform


def both(*transforms):
    def transform(table):
        for step in transforms:
            table = step(table)
        return table
    return transform


REVERSED_IDS = set_column("cand_id", [7, 6, 5, 4, 3, 2, 1, 0])


def test_validate_accepts_cand_ids_out_of_order(tmp_path):
    folder = tmp_path / "d"
    write_toy(folder)
    rewrite(folder / "candidates.parquet", both(REVERSED_IDS, set_column("suppressed_by", [-1, 7, -1, 7, -1, -1, 2, -1])))
    validate_ledger(folder)  # row 6 names cand_id 2: row 5, a survivor of the same image


@pytest.mark.parametrize("file, transform, message", [
    ("candidates.parquet", lambda t: t.drop(["iou_any"]), "candidates.parquet: missing column(s) iou_any"),
    ("candidates.parquet", set_column("iou", [0.5] * 8, pa.float64()), "column iou is double, expected float"),
    ("candidates.parquet", set_column("level", [0] * 8, pa.int64()), "column level is int64, expected int8"),
    ("images.parquet", set_column("width", [1.0, 2.0], pa.float64()), "images.parquet: column width is double"),
    ("candidates.parquet", set_column("cand_id", [0, 1, 2, 3, 4, 5, 6, 1]), "row 7: duplicate cand_id 1"),
    ("candidates.parquet", set_column("suppressed_by", [-1, 0, -1, 0, -1, -1, 99, -1]),
     "row 6 (cand_id 6): suppressed_by names no cand_id"),
    ("candidates.parquet", set_column("suppressed_by", [-1, 0, -1, 1, -1, -1, 5, -1]),
     "row 3 (cand_id 3): suppressed_by names a candidate that did not survive NMS"),
    ("candidates.parquet", set_column("suppressed_by", [-1, 0, -1, 0, -1, -1, 0, -1]),
     "row 6 (cand_id 6): suppressed_by names a candidate of another image"),
    ("candidates.parquet", set_column("suppressed_by", [2, 0, -1, 0, -1, -1, 5, -1]),
     "row 0 (cand_id 0): kept but suppressed_by is not -1"),
    # cand_ids out of order (a ledger written elsewhere): the same three rules, found through a sort
    ("candidates.parquet", both(REVERSED_IDS, set_column("suppressed_by", [-1, 7, -1, 7, -1, -1, 99, -1])),
     "row 6 (cand_id 1): suppressed_by names no cand_id"),
    ("candidates.parquet", both(REVERSED_IDS, set_column("suppressed_by", [-1, 7, -1, 7, -1, -1, 4, -1])),
     "row 6 (cand_id 1): suppressed_by names a candidate that did not survive NMS"),
    ("candidates.parquet", both(REVERSED_IDS, set_column("suppressed_by", [-1, 7, -1, 7, -1, -1, 7, -1])),
     "row 6 (cand_id 1): suppressed_by names a candidate of another image"),
    ("candidates.parquet", set_column("iou", [0.5, 0.5, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5]), "row 2 (cand_id 2): iou is outside [0, 1]"),
    ("candidates.parquet", set_column("iou_any", [0.75] * 7 + [float("nan")]), "row 7 (cand_id 7): iou_any is outside"),
    ("candidates.parquet", set_column("x2", [10, 11, 60, 10, 25, 25, 25, 60]), "row 7 (cand_id 7): inverted box (x2 < x1)"),
    ("candidates.parquet", set_column("image_id", [1, 1, 1, 1, 2, 2, 2, 3]), "row 7: image_id 3 is not in images.parquet"),
    ("images.parquet", set_column("image_id", [1, 1]), "images.parquet: row 1: duplicate image_id 1"),
    ("raw_counts.parquet", set_column("stage", ["raw"] * 11 + ["bogus"] * 5), "row 11: stage 'bogus'"),
])
def test_validate_names_file_and_problem(tmp_path, file, transform, message):
    folder = tmp_path / "d"
    write_toy(folder)
    validate_ledger(folder)
    rewrite(folder / file, transform)
    with pytest.raises(InputError) as err:
        validate_ledger(folder)
    assert file in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_folder_level_problems(tmp_path):
    with pytest.raises(InputError, match="not a ledger folder .no such folder"):
        validate_ledger(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a ledger folder .none of"):
        validate_ledger(tmp_path / "empty")
    folder = tmp_path / "d"
    write_toy(folder)
    (folder / "raw_counts.parquet").unlink()
    with pytest.raises(InputError, match="raw_counts.parquet: missing"):
        validate_ledger(folder)
    write_toy(folder)
    (folder / "meta.json").write_text('{"schema_version": 99}')
    with pytest.raises(InputError, match="schema_version 99"):
        read_ledger(folder)
    (folder / "meta.json").write_text("[1, 2")
    with pytest.raises(InputError, match="meta.json: not valid JSON"):
        validate_ledger(folder)
    write_toy(folder)
    (folder / "images.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="images.parquet: not a readable Parquet file"):
        validate_ledger(folder)


def test_read_only_requested_columns(tmp_path):
    write_toy(tmp_path)
    frame = read_candidates(tmp_path, columns=["image_id", "iou"])
    assert list(frame.columns) == ["image_id", "iou"] and len(frame) == 8
    ledger = read_ledger(tmp_path, columns=["kept"])
    assert list(ledger.candidates.columns) == ["kept"] and ledger.pre_nms and ledger.name == tmp_path.name
    rewrite(tmp_path / "candidates.parquet", lambda t: t.drop(["score"]))
    read_candidates(tmp_path, columns=["iou"])  # an unrelated missing column does not matter here
    with pytest.raises(InputError, match="missing column.s. score"):
        read_candidates(tmp_path, columns=["score"])


# --- candidates as a folder of Parquet parts (multi-GPU dumps) ---------------------------------------


def _split_into_parts(folder, num_parts=3):
    """Rewrite folder/candidates.parquet as folder/candidates.parquet/part-*.parquet (same rows, in order)."""
    table = pq.read_table(folder / "candidates.parquet")
    (folder / "candidates.parquet").unlink()
    (folder / "candidates.parquet").mkdir()
    bounds = np.linspace(0, table.num_rows, num_parts + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):  # parts cut through images too
        pq.write_table(table.slice(lo, hi - lo), folder / "candidates.parquet" / f"part-{k:03d}.parquet",
                       row_group_size=max(1, (hi - lo) // 2))
    return table


def test_candidates_folder_of_parts_reads_validates_and_analyses_like_one_file(tmp_path):
    import shutil

    from misalign.metrics import STREAMED_ANALYSIS_COLUMNS, analyze
    from misalign.synthetic import synthetic_ledger

    gt = synthetic_ledger(tmp_path / "one", num_images=12, cands_per_image=80, seed=3, gt_path=tmp_path / "gt.json")
    shutil.copytree(tmp_path / "one", tmp_path / "parts")
    table = _split_into_parts(tmp_path / "parts")
    assert (tmp_path / "parts" / "candidates.parquet").is_dir()
    validate_ledger(tmp_path / "parts")
    single, parts = read_candidates(tmp_path / "one"), read_candidates(tmp_path / "parts")
    pd.testing.assert_frame_equal(parts, single)
    assert len(parts) == table.num_rows
    kept = read_candidates(tmp_path / "parts", ["cand_id", "x1", "w"], kept_only=True)
    expected = single.loc[single["kept"], ["cand_id", "x1", "w"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, expected)
    assert 0 < len(kept) < len(single)
    a = analyze(read_ledger(tmp_path / "one", STREAMED_ANALYSIS_COLUMNS), gt, bootstrap=20).metrics
    b = analyze(tmp_path / "parts", gt, bootstrap=20).metrics
    assert a == b and a["ap"]["AP"] > 0


def test_candidates_parts_problems_name_the_part_or_row(tmp_path):
    write_toy(tmp_path / "d")
    table = _split_into_parts(tmp_path / "d", num_parts=2)
    validate_ledger(tmp_path / "d")
    part = tmp_path / "d" / "candidates.parquet" / "part-001.parquet"
    bad = table.slice(table.num_rows // 2).to_pandas()
    bad.loc[bad.index[1], "iou"] = 1.5  # second row of the second part
    pq.write_table(pa.Table.from_pandas(bad, schema=CANDIDATE_SCHEMA, preserve_index=False), part)
    with pytest.raises(InputError, match=rf"row {table.num_rows // 2 + 1} .*iou is outside"):
        validate_ledger(tmp_path / "d")
    pq.write_table(pa.Table.from_pandas(bad.drop(columns=["iou_any"]), preserve_index=False), part)
    with pytest.raises(InputError, match="part-001.parquet: its columns differ"):
        validate_ledger(tmp_path / "d")
    for p in (tmp_path / "d" / "candidates.parquet").iterdir():
        p.unlink()
    with pytest.raises(InputError, match="without Parquet parts"):
        validate_ledger(tmp_path / "d")
