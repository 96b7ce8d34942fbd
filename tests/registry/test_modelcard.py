"""Model cards stay true, bounded and inert whatever users write into tags and names."""

import re
from types import SimpleNamespace

from liverseg.registry.modelcard import code, md, model_description, version_description

EVIL = "<img src=x onerror=alert(1)> [win](http://evil.example) **bold** | `tick` \x1b[2J\nsecond line"


def _version(v: int, **tags) -> SimpleNamespace:
    return SimpleNamespace(name="liver-unet", version=str(v), tags={"test_dice": "0.95", "val_dice": "0.9", **tags})


def test_user_text_is_literal_markdown():
    out = md(EVIL)
    for special in "<>[]*|`":  # every Markdown/HTML character comes escaped
        assert re.search(rf"(?<!\\){re.escape(special)}", out) is None, special
    assert "\x1b" not in out and "\n" not in out and "http://" not in out  # no control characters, no autolink
    assert out.startswith("\\<img src=x onerror=alert(1)\\> \\[win\\](http:\\/\\/evil.example)")
    assert code("a`b\nc") == "`ab c`" and code("") == "-" and len(code("x" * 500)) == 82


def test_the_model_card_is_bounded_whatever_the_number_of_versions():
    versions = [_version(v, promotion_decision="rejected") for v in range(1, 401)]
    text = model_description("liver-unet", versions, {"champion": "7", "challenger": "400"})
    assert len(text) <= 5000 and "| v400 | challenger |" in text and "| v7 | champion |" in text
    assert "| v380 |" not in text and "379 older versions: see the Versions tab." in text


def test_the_card_warns_of_a_bypass_and_shows_store_grid_scores():
    versions = [_version(1, test_dice="", test_dice_store_grid="0.957")]
    text = model_description("liver-unet", versions, {"champion": "1"}, warning="moved outside `liverseg promote`")
    assert "**Warning**: moved outside \\`liverseg promote\\`" in text and "| v1 | champion | 0.9570 |" in text


def test_a_version_card_escapes_everything_users_wrote_and_fits():
    mv = _version(
        3,
        promotion_decision="promoted",
        promotion_reason=EVIL * 50,
        decided_by="<script>",
        champion_reason=EVIL,
        champion_at="2026-12-02T10:00:00Z",
        **{"gate.rule": "superior", "gate.diff_mean": "0.0123", "gate.diff_ci_low": "0.004"},
    )
    run = SimpleNamespace(
        data=SimpleNamespace(
            tags={"store_path": "`/x` [a](http://b)", "git_commit": "abc"}, params={"train.lr": "1e-3`"}
        ),
        info=SimpleNamespace(run_id="r1", run_name="<b>run</b>"),
        inputs=SimpleNamespace(dataset_inputs=[]),
    )
    text = version_description(mv, run)
    assert len(text) <= 5000 and "<script>" not in text and "<b>" not in text and "\x1b" not in text
    assert "**Gate**: rule `superior`" in text and "paired Dice difference 0.0123" in text
    assert "`/x [a](http://b)`" in text  # inside a code span: shown as typed, minus the backticks
