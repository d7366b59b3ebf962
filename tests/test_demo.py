"""`misalign demo` runs every step once and reuses finished steps on a re-run.

The steps themselves (shapes, train, dump, report) have their own tests; here they are replaced by
recorders that write the files each real step would leave behind.
"""

import pytest
from click.testing import CliRunner

import pipeline as demo
import reports
from cli import main
from detector.model import MODEL_NAMES


def _install_recorders(monkeypatch, calls):
    def shapes(out, **kwargs):
        (out / "annotations").mkdir(parents=True)
        (out / "annotations" / "instances_val.json").write_text("{}")
        calls.append(("shapes", out.name))

    def train(config):
        run = demo.Path(config.out)
        run.mkdir(parents=True, exist_ok=True)
        (run / "checkpoint.pt").write_text("")
        (run / "eval.json").write_text("{}")
        calls.append(("train", config.model, config.resume is not None))

    def dump(config):
        demo.Path(config.out).mkdir(parents=True, exist_ok=True)
        (demo.Path(config.out) / "meta.json").write_text("{}")
        calls.append(("dump", demo.Path(config.out).name, demo.Path(config.ckpt).parent.name))

    def write_report(dumps, out, **options):
        calls.append(("report", tuple(demo.Path(d).name for d in dumps), options["before_after_nms"],
                      options["rescore"]))
        return demo.Path(out) / "index.html"

    monkeypatch.setattr(demo, "write_shapes_dataset", shapes)
    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "dump", dump)
    monkeypatch.setattr(reports, "write_report", write_report)


def test_first_run_does_every_step_in_order(tmp_path, monkeypatch):
    calls = []
    _install_recorders(monkeypatch, calls)
    index = demo.run_demo(tmp_path)
    assert calls == [
        ("shapes", "shapes"),
        ("train", "retinanet", False), ("dump", "retinanet", "retinanet"),
        ("train", "retinanet-conf", False), ("dump", "retinanet-conf", "retinanet-conf"),
        ("report", ("retinanet", "retinanet-conf"), True, False),
    ]
    assert index == tmp_path / "report" / "index.html"


def test_rerun_reuses_finished_steps_and_resumes_an_interrupted_run(tmp_path, monkeypatch):
    calls = []
    _install_recorders(monkeypatch, calls)
    demo.run_demo(tmp_path)
    (tmp_path / "runs" / "retinanet-conf" / "eval.json").unlink()  # interrupted after an epoch
    (tmp_path / "dumps" / "retinanet-conf" / "meta.json").unlink()
    calls.clear()
    demo.run_demo(tmp_path)
    assert calls == [
        ("train", "retinanet-conf", True),
        ("dump", "retinanet-conf", "retinanet-conf"),
        ("report", ("retinanet", "retinanet-conf"), True, False),
    ]


def test_the_zoo_trains_dumps_and_rescores_every_variant(tmp_path, monkeypatch):
    calls = []
    _install_recorders(monkeypatch, calls)
    result = CliRunner().invoke(main, ["demo", "--models", "all", "--rescore", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [c[1] for c in calls if c[0] == "train"] == list(MODEL_NAMES)
    assert [(c[1], c[2]) for c in calls if c[0] == "dump"] == [(name, name) for name in MODEL_NAMES]
    assert calls[-1] == ("report", MODEL_NAMES, True, True)


def test_a_chosen_subset_keeps_its_order_and_drops_repeats(tmp_path, monkeypatch):
    calls = []
    _install_recorders(monkeypatch, calls)
    result = CliRunner().invoke(main, ["demo", "--models", "cl-nms, dr-loss,cl-nms", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls[-1] == ("report", ("cl-nms", "dr-loss"), True, False)


@pytest.mark.parametrize("models, problem", [("retinanet,fcos", "unknown 'fcos'"), (" , ", "no model given")])
def test_bad_models_give_one_line_and_touch_nothing(models, problem, tmp_path):
    result = CliRunner().invoke(main, ["demo", "--models", models, "--out", str(tmp_path / "zoo")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --models: {problem}; choose from retinanet, ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "zoo").exists()
