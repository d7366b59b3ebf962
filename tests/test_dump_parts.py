"""The dump in parts (docs/ledger.md "Dumps in parts"): sharded over processes with torchrun and
resumed after a kill, the ledger is the one-process, uninterrupted dump's, row for row."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cli import main
from detector.dump import DumpConfig, dump
from misalign.ledger import read_candidates, read_images, read_raw, read_raw_counts, validate_ledger
from misalign.parts import CAND_ID_STRIDE, staging_folder
from test_dump import _checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("created", "timing")  # the meta.json keys that differ between runs of one dump


@pytest.fixture(scope="module")
def checkpoint(shapes_dataset, tmp_path_factory):
    categories = json.loads((shapes_dataset / "annotations/instances_val.json").read_text())["categories"]
    return _checkpoint(tmp_path_factory.mktemp("parts"), "retinanet-conf", sorted(c["id"] for c in categories))


def _options(ckpt, data, out, **more) -> dict:
    return {"ckpt": str(ckpt), "out": str(out), "data": str(data), "split": "val", "workers": 0, "batch_size": 2,
            "part_images": 2, "raw_images": 3, **more}


def _cli_args(options: dict) -> list[str]:
    args = ["dump"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def reference(checkpoint, shapes_dataset, tmp_path_factory):
    """The one-process, uninterrupted dump in parts of two images (6 images: 3 parts)."""
    out = tmp_path_factory.mktemp("reference") / "ledger"
    dump(DumpConfig(**_options(checkpoint, shapes_dataset, out)))
    return out


def assert_same_ledger(folder: Path, expected: Path) -> None:
    validate_ledger(folder)
    pd.testing.assert_frame_equal(read_candidates(folder), read_candidates(expected))
    for read in (read_images, read_raw_counts):
        pd.testing.assert_frame_equal(read(folder), read(expected))
    raw, expected_raw = read_raw(folder), read_raw(expected)
    assert (raw is None) == (expected_raw is None)
    if raw is not None:
        pd.testing.assert_frame_equal(raw, expected_raw)
    assert (folder / "detections.json").read_text() == (expected / "detections.json").read_text()
    meta, reference_meta = (json.loads((f / "meta.json").read_text()) for f in (folder, expected))
    assert {k: v for k, v in meta.items() if k not in TIMING} == {k: v for k, v in reference_meta.items() if k not in TIMING}
    assert not staging_folder(folder).exists()


def test_parts_number_their_rows_by_part_and_keep_suppressors_within(reference):
    validate_ledger(reference)
    assert sorted(p.name for p in (reference / "candidates.parquet").iterdir()) == [
        "part-0000000-0000001.parquet", "part-0000002-0000003.parquet", "part-0000004-0000005.parquet"]
    cands = read_candidates(reference, ["cand_id", "image_id", "suppressed_by"])
    part = cands["cand_id"] // CAND_ID_STRIDE
    assert sorted(part.unique()) == [0, 1, 2] and (cands["cand_id"] % CAND_ID_STRIDE < CAND_ID_STRIDE // 2).all()
    losers = cands[cands["suppressed_by"] >= 0]
    assert len(losers) and ((losers["suppressed_by"] // CAND_ID_STRIDE) == part[losers.index]).all()
    assert len(read_images(reference)) == 6 and read_raw(reference)["image_id"].nunique() == 3


def test_a_dump_in_parts_has_the_rows_of_a_dump_in_one(reference, checkpoint, shapes_dataset, tmp_path):
    whole = tmp_path / "whole"
    dump(DumpConfig(**_options(checkpoint, shapes_dataset, whole, part_images=6)))
    assert (whole / "candidates.parquet").is_file()  # one part: one file, numbered 0, 1, 2, ...
    one, parted = read_candidates(whole), read_candidates(reference)
    assert one["cand_id"].tolist() == list(range(len(one)))
    renumber = dict(zip(parted["cand_id"], one["cand_id"]))
    parted["suppressed_by"] = parted["suppressed_by"].map(lambda c: renumber.get(c, -1))
    pd.testing.assert_frame_equal(parted.assign(cand_id=one["cand_id"]), one)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def test_torchrun_two_processes_write_the_one_process_ledger(reference, checkpoint, shapes_dataset, tmp_path):
    out = tmp_path / "ledger"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cli",
               *_cli_args(_options(checkpoint, shapes_dataset, out)), "--device", "cpu"]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(out)  # one line, from rank 0
    assert_same_ledger(out, reference)


_SLOW_DUMP = """
import sys, time
import detector.dump as dump
batch = dump.ledger_batch
def slow(*args):  # a slow model: time to kill the dump between parts
    time.sleep(0.4)
    return batch(*args)
dump.ledger_batch = slow
from cli import main
main(sys.argv[1:])
"""


def test_a_killed_dump_resumes_to_the_uninterrupted_ledger(reference, checkpoint, shapes_dataset, tmp_path):
    out = tmp_path / "ledger"
    options = _options(checkpoint, shapes_dataset, out)
    process = subprocess.Popen([sys.executable, "-c", _SLOW_DUMP, *_cli_args(options)], cwd=ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = staging_folder(out)
    try:
        while process.poll() is None and len(list(staging.glob("part-*"))) < 1:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = sorted(p.name for p in staging.glob("part-*"))
    assert 1 <= len(finished) < 3 and not out.exists(), finished  # killed partway
    reused = {name: (staging / name / "candidates.parquet").stat().st_mtime_ns for name in finished}
    result = CliRunner().invoke(main, [*_cli_args(options), "--resume"])
    assert result.exit_code == 0, result.output
    assert_same_ledger(out, reference)
    for name, mtime in reused.items():  # the finished parts were kept, not redone
        assert (out / "candidates.parquet" / f"{name}.parquet").stat().st_mtime_ns == mtime


def test_ctrl_c_keeps_the_finished_parts(reference, checkpoint, shapes_dataset, tmp_path, monkeypatch):
    import detector.dump as module

    out = tmp_path / "ledger"
    options = _options(checkpoint, shapes_dataset, out)
    batch, calls = module.ledger_batch, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:  # after two parts
            raise KeyboardInterrupt
        return batch(*args)

    monkeypatch.setattr(module, "ledger_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dump(DumpConfig(**options))
    assert sorted(p.name for p in staging_folder(out).iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "part-0000000-0000001", "part-0000002-0000003"]
    monkeypatch.setattr(module, "ledger_batch", batch)
    dump(DumpConfig(**options, resume=True))
    assert_same_ledger(out, reference)
    dump(DumpConfig(**options, resume=True))  # complete already: nothing to do, nothing changed
    assert_same_ledger(out, reference)


def test_resume_refuses_other_settings_naming_the_file(checkpoint, shapes_dataset, tmp_path, monkeypatch):
    import detector.dump as module

    out = tmp_path / "ledger"
    options = _options(checkpoint, shapes_dataset, out)
    monkeypatch.setattr(module, "ledger_batch", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        dump(DumpConfig(**{**options, "part_images": 1}))  # leaves nothing to resume: no part finished
    assert not staging_folder(out).exists()
    monkeypatch.undo()
    runner = CliRunner()
    first = runner.invoke(main, _cli_args(options))
    assert first.exit_code == 0, first.output
    for change, differs in [({"topk": 10}, "detector.config.topk"), ({"batch_size": 1}, "parts.settings.batch_size")]:
        result = runner.invoke(main, [*_cli_args({**options, **change}), "--resume"])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (f"error: {out / 'meta.json'}: a ledger of another dump ({differs} differs); "
                                         "run without --resume to start over")
    # a staging folder of other settings: the manifest is named
    staging = staging_folder(out)
    staging.mkdir()
    (staging / "manifest.json").write_text(json.dumps({"meta": {"checkpoint_sha256": "other"}, "images": []}))
    result = runner.invoke(main, [*_cli_args(options), "--resume"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{staging / 'manifest.json'}: a staging folder of another dump" in result.stderr


def test_an_error_in_the_background_writer_is_one_line_and_nothing_is_renamed(checkpoint, shapes_dataset, tmp_path,
                                                                              monkeypatch):
    import misalign.recorder as recorder

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", "candidates.parquet")

    monkeypatch.setattr(recorder._PartWriter, "flush", disk_full)
    out = tmp_path / "ledger"
    result = CliRunner().invoke(main, _cli_args(_options(checkpoint, shapes_dataset, out)))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == ("error: writing the ledger failed: candidates.parquet: "
                                                      "No space left on device")
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("command", [["dump", "--ckpt", "CKPT"], ["capture", "torchvision", "--model", "retinanet_resnet50_fpn"]])
def test_part_images_below_one_is_one_line_and_writes_nothing(tmp_path, command, checkpoint, shapes_dataset):
    args = [str(checkpoint) if a == "CKPT" else a for a in command]
    result = CliRunner().invoke(main, [*args, "--data", str(shapes_dataset), "--out", str(tmp_path / "out"),
                                       "--part-images", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --part-images: 0 must be at least 1"]
    assert not any(tmp_path.iterdir())
