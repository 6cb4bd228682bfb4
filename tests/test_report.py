"""`fishcomp report`: the page, its PNGs and its numbers, and the scores it is built on."""

import html
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from helpers import CONFIGS, TINY, run_cli
from PIL import Image

from fishcomp.metrics import attention_scores, size_only_log_loss


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.numbers, self._name = [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "dd" and attrs.get("class") == "number":
            self._name = attrs["data-name"]
            self.numbers.setdefault(self._name, [])

    def handle_data(self, data):
        if self._name is not None:
            self.numbers[self._name].append(data.strip())
            self._name = None


@pytest.fixture(scope="module")
def report_page(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    blend = root / "blend.yaml"
    blend.write_text(
        "name: blend\ncalibrate: {}\nensemble:\n  weights: fitted\n  members:\n"
        f"    - {{config: {CONFIGS / 'bbox.yaml'}}}\n    - {{config: {CONFIGS / 'fcn.yaml'}}}\n"
    )
    args = ["report", blend, "--data", tiny_data, "--work", root / "work", "--out", root / "out", "--set", "precompute.size=[128,224]"]
    for override in TINY:
        args += ["--set", override]
    return root, args


@pytest.fixture
def reported(report_page, capsys):
    """report_page after the report was made, whichever test made it: a test that reads the
    report's runs passes alone too (`-k`), not only after the page test."""
    root, args = report_page
    if not (root / "out" / "index.html").is_file():
        code, _, stderr = run_cli(args, capsys)
        assert code == 0, stderr
    return report_page


def test_the_page_its_pictures_and_its_numbers(report_page, capsys):
    root, args = report_page
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    page = root / "out" / "index.html"
    assert f"report     wrote   {page}" in stdout
    parser = _Page()
    parser.feed(page.read_text())
    assert len(parser.images) >= 15
    for name in parser.images:
        with Image.open(root / "out" / name) as image:
            image.load()
            assert image.format == "PNG" and image.width > 100
    names = set(parser.images)
    assert {"data_classes.png", "data_size_class.png"} <= names
    assert any(n.endswith("_iou.png") for n in names) and any(n.endswith("_boxes_valid.png") for n in names)
    # A box is scored against the largest fish and against the nearest one (any fish it found).
    largest, nearest = (float(parser.numbers[k][0]) for k in ("mean box IoU (validation images with a box)", "mean box IoU with the nearest annotated fish"))
    assert 0 < largest <= nearest <= 1
    assert any("heatmaps/grid.png" in n for n in names) and any(n.endswith("_correlation.png") for n in names)
    assert any(n.endswith("_top_losses.png") for n in names) and any(n.endswith("_confusion.png") for n in names)

    # The numbers on the page are the runs' own.
    for folder in (root / "work" / "train").glob("*-*"):
        summary = json.loads((folder / "summary.json").read_text())
        shown = [v for v in parser.numbers["valid log loss"]]
        assert f"{summary['valid_logloss']:.4f}" in shown
        # How each fold ended, from the summary, in a table of its own.
        ended = ["early stopping" if f["stopped_early"] else "converged" if f["converged"] else "ran out of epochs" for f in summary["stopping"]]
        caption = f"training per fold (epoch chosen on: {summary['epochs_chosen_on']})"
        run_section = page.read_text().split(html.escape(f"run {summary['name']} ("), 1)[1]
        table = run_section.split(html.escape(caption), 1)[1].split("</table>", 1)[0]
        assert re.findall(r"<td>(early stopping|converged|ran out of epochs)</td>", table) == ended
    blend = json.loads(next((root / "work" / "ensemble").glob("blend-*/summary.json")).read_text())
    assert parser.numbers["blend valid log loss"] == [f"{blend['valid_logloss']:.4f}"]
    versus = blend["versus_best_member"]
    assert parser.numbers[f"that blend minus {versus['member']} alone, per image (95 % interval)"] == [
        f"{versus['difference']:+.4f} [{versus['low']:+.4f}, {versus['high']:+.4f}]"]
    # The members the blend does not use, with what leaving them out saves; the members' table has each one's seconds.
    idle, shown_idle = blend["at_weight_zero"], "members at weight 0, and the seconds of what only they need (leaving them out saves it)"
    if idle["members"]:
        assert parser.numbers[shown_idle] == [f"{', '.join(idle['members'])}: {idle['seconds_own']:.0f} s"]
    else:
        assert shown_idle not in parser.numbers
    assert "<th>seconds_own</th>" in page.read_text() and "<th>seconds_shared</th>" in page.read_text()
    calibrated = json.loads(next((root / "work" / "calibrate").glob("blend-*/summary.json")).read_text())
    assert parser.numbers["temperature"] == [f"{calibrated['temperature']:.3f}"]
    assert parser.numbers["cross-fitted, temperature"] == [f"{calibrated['cross_fitted_by_kind']['temperature']:.4f}"]
    if calibrated["bias"]:
        assert parser.numbers["per-class shift of the log-probabilities"][0].startswith(f"ALB {calibrated['bias']['ALB']:+.2f}, BET")
    shown = parser.numbers["test_stg1 temperature (for the mean of the fold models)"]
    assert shown == [f"{calibrated['test_temperatures']['test_stg1']:.3f}"] and float(shown[0]) < calibrated["temperature"]
    assert parser.numbers["valid log loss before calibration"] == [f"{blend['valid_logloss']:.4f}"]  # what it calibrated
    assert any(n.endswith("_reliability.png") for n in names)
    pointing, chance = (float(parser.numbers[k][0]) for k in ("attention: heatmap peak inside the box (pointing)", "attention: chance (mean box area / image area)"))
    assert 0 <= pointing <= 1 and 0 < chance < 0.5
    by_size, prior = (float(parser.numbers[k][0]) for k in ("log loss from image size alone (5-fold)", "log loss of the class prior (same folds)"))
    assert by_size < prior  # synthetic boats leak their class mix through the image size, as real ones do


def test_a_run_can_be_named_by_its_artifact_folder(reported, capsys):
    root, args = reported
    folder = next((root / "work" / "train").glob("bbox-*"))
    code, stdout, stderr = run_cli(["report", folder, *args[2:6], "--out", root / "by_folder"], capsys)
    assert code == 0, stderr
    assert re.search(r"bbox-\w+_boxes_valid\.png", (root / "by_folder" / "index.html").read_text())


def test_a_bad_run_name_is_a_one_line_error(tiny_data, tmp_path, capsys):
    code, _, stderr = run_cli(["report", tmp_path, "--data", tiny_data, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not a finished train or ensemble artifact" in stderr


def test_attention_scores_are_one_when_the_peak_is_in_the_box_and_chance_when_random():
    rng = np.random.default_rng(0)
    boxes = np.column_stack([rng.uniform(0, 0.7, 400), rng.uniform(0, 0.7, 400), np.full(400, 0.2), np.full(400, 0.25)])
    maps = rng.normal(size=(400, 12, 20))
    random = attention_scores(maps, boxes)
    assert random["chance"] == pytest.approx(0.05)
    assert abs(random["pointing"] - 0.05) < 0.03 and abs(random["mass"] - 0.05) < 0.02
    aimed = maps.copy()
    for i, (x, y, w, h) in enumerate(boxes):
        aimed[i, int((y + h / 2) * 12), int((x + w / 2) * 20)] = 50.0
    assert attention_scores(aimed, boxes)["pointing"] == 1.0


def test_size_only_log_loss_is_the_prior_without_information_and_far_lower_with_it():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 8, 500)
    folds = np.arange(500) % 5
    same, prior = size_only_log_loss(labels, np.full(500, "1280x720"), folds, 8)
    assert same == pytest.approx(prior)
    telling, prior = size_only_log_loss(labels, np.array([f"{100 + label}x100" for label in labels]), folds, 8)
    assert telling < prior / 5
