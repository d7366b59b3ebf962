"""The report page in a real browser: headless Chromium loads index.html from disk, with the network
cut off, and every embedded figure decodes; the tables are there.

A copy of the page gets one small script that, once the page has loaded, writes a marker with the
number of images that decoded (`img.complete && img.naturalWidth > 0`); `--dump-dom` returns the
rendered DOM. Skipped (saying so) when no Chromium is installed; `.ci/run` installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from cli import main
from misalign.synthetic import synthetic_ledger

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed: `apt-get install chromium` "
                                                         "(Debian) to run the browser test; CI installs it")

CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var marker = document.createElement("div");
  marker.id = "misalign-check";
  marker.textContent = "images " + ok + "/" + images.length + " tables " + document.querySelectorAll("table").length;
  document.body.appendChild(marker);
});
</script>
"""


def chromium(*args, tmp_path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               "--host-resolver-rules=MAP * ~NOTFOUND", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    sizes = dict(num_images=8, cands_per_image=80, num_categories=3, gt_per_image=3, kept_per_image=10)
    gt = synthetic_ledger(root / "retinanet", seed=1, with_obj=False, gt_path=root / "gt.json", **sizes)
    synthetic_ledger(root / "retinanet-conf", seed=2, gt_path=gt, **sizes)
    result = CliRunner().invoke(main, ["report", "--before-after-nms", str(root / "retinanet"),
                                       str(root / "retinanet-conf"), "--out", str(root / "report"),
                                       "--images", "2", "--bootstrap", "20"])
    assert result.exit_code == 0, (result.output, result.exception)
    return root / "report"


def test_page_loads_offline_and_every_image_decodes(report, tmp_path):
    html = (report / "index.html").read_text()
    num_images = html.count("<img ")
    num_tables = html.count("<table")
    assert num_images >= 8 and num_tables >= 8
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", CHECK + "</body>"))
    result = chromium("--virtual-time-budget=10000", "--dump-dom", checked.as_uri(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    marker = re.search(r'<div id="misalign-check">([^<]*)</div>', dom)
    assert marker, dom[-2000:]
    assert marker.group(1) == f"images {num_images}/{num_images} tables {num_tables}"
    for title in ("Summary", "Headline differences", "Table 1", "Figure 2", "Correlation and divergence",
                  "COCO AP / AR", "Settings and provenance"):
        assert title in dom, title
    assert 'data-table="summary"' in dom and 'data-table="coco_ap"' in dom


def test_page_renders_to_a_screenshot(report, tmp_path):
    shot = tmp_path / "page.png"
    result = chromium("--hide-scrollbars", "--window-size=1400,3000", f"--screenshot={shot}",
                      (report / "index.html").as_uri(), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1400)
    # not a blank page: text and figures put dark pixels on many rows of the first 3000 px
    assert int((pixels.min(axis=1) < 128).sum()) > 1000
