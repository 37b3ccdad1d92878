"""Whose README.md is it? lazymoe replaces only a card it wrote: one matching its record, or, in a model folder
from before the record existed, one that is recognisably lazymoe's card. Anything else is the user's: refused
without --overwrite, left by the steps that update the card as a side effect, uploaded as it is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from helpers import one_line_error, stand_in_demo
from hubserver import ALICE_WRITE_TOKEN

import lazymoe
from lazymoe.cli import main
from lazymoe.io.folder import CARD_RECORD, card_edited, card_kept_because
from lazymoe.publish.card import rerender_card
from lazymoe.publish.gguf_card import write_gguf_card
from lazymoe.publish.hub import _card_for_repo, push_to_hub

#: a README the user wrote: it even carries lazymoe's tag, as a card copied from a lazymoe repo would
USERS_README = """---
license: apache-2.0
tags:
- lazymoe
---
# My model

Notes I wrote myself.
"""


def refused(card: Path) -> str:
    return (f"{card} was not written by lazymoe; add --overwrite to replace it with lazymoe's card (print it instead "
            "with --stdout).")


def gguf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "moe-GGUF"
    folder.mkdir()
    (folder / "moe.Q8_0.gguf").write_bytes(b"GGUF" + bytes(range(256)))
    return folder


def test_a_readme_in_a_gguf_folder_without_a_record_is_the_users(hub, tmp_path, capsys, caplog):
    folder = gguf_folder(tmp_path)
    card = folder / "README.md"
    card.write_text(USERS_README, encoding="utf-8")
    assert card_kept_because(folder) == "was not written by lazymoe" and card_edited(folder)

    assert one_line_error(capsys, ["card", str(folder), "--gguf-of", "alice/moe"]) == refused(card)
    with caplog.at_level(logging.WARNING):
        assert write_gguf_card(folder, base_repo_id="alice/moe") is None  # what publish does
    assert f"{card} was not written by lazymoe, so it is left as it is (the push uploads it as it is)" in caplog.text
    push_to_hub(folder, "moe-GGUF", token=ALICE_WRITE_TOKEN, progress=False)
    assert hub.files("alice/moe-GGUF")["README.md"].data.decode() == USERS_README
    assert card.read_text(encoding="utf-8") == USERS_README and not (folder / CARD_RECORD).exists()

    assert main(["-q", "card", str(folder), "--gguf-of", "alice/moe", "--overwrite"]) == 0
    assert "GGUF files of [alice/moe]" in card.read_text(encoding="utf-8") and not card_edited(folder)


def test_a_card_lazymoe_wrote_before_it_kept_a_record_is_still_lazymoes(merged, capsys):
    card = merged / "README.md"
    (merged / CARD_RECORD).unlink()  # as a merge from before the record left it
    assert card_kept_because(merged) is None
    assert _card_for_repo(merged, "alice/moe") is not None  # a push renders it for the repo
    assert main(["-q", "card", str(merged), "--repo-id", "alice/moe"]) == 0
    assert "alice/moe" in card.read_text(encoding="utf-8") and (merged / CARD_RECORD).is_file()
    (merged / CARD_RECORD).unlink()
    assert rerender_card(merged, repo_id="alice/other") == card  # route, eval, publish
    assert "alice/other" in card.read_text(encoding="utf-8")


def test_the_users_own_readme_in_a_model_folder_without_a_record_is_not_replaced(hub, merged, capsys, caplog):
    card = merged / "README.md"
    card.write_text(USERS_README, encoding="utf-8")
    (merged / CARD_RECORD).unlink()

    assert one_line_error(capsys, ["card", str(merged)]) == refused(card)
    with caplog.at_level(logging.WARNING):
        assert rerender_card(merged, repo_id="alice/moe") is None
    assert f"{card} was not written by lazymoe, so it is left as it is" in caplog.text
    assert main(["-q", "push", str(merged), "moe", "--token", ALICE_WRITE_TOKEN]) == 0
    assert hub.files("alice/moe")["README.md"].data.decode() == USERS_README
    assert card.read_text(encoding="utf-8") == USERS_README

    assert main(["-q", "card", str(merged), "--overwrite"]) == 0
    assert "My model" not in card.read_text(encoding="utf-8") and not card_edited(merged)


def test_a_demo_rebuild_keeps_a_readme_the_user_wrote_in_its_gguf_folder(merged, recipe, tmp_path, monkeypatch):
    work = tmp_path / "work"
    stand_in_demo(monkeypatch, recipe, merged)
    gguf_dir = work / "merged-GGUF"
    gguf_dir.mkdir(parents=True)
    (gguf_dir / "merged.Q8_0.gguf").write_bytes(b"GGUF" + bytes(64))
    (gguf_dir / "README.md").write_text(USERS_README, encoding="utf-8")
    assert main(["-q", "demo", str(work)]) == 0
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["README.md"]  # the stale GGUF file went, the README stayed
    assert (gguf_dir / "README.md").read_text(encoding="utf-8") == USERS_README


def test_publish_tells_a_front_end_which_card_it_kept(hub, merged, monkeypatch):
    """The notebook shows each README.md that publish leaves (and uploads) as it is: release says which."""
    import lazymoe.pipeline.release as releasing

    gguf_dir = gguf_folder(merged.parent)
    (gguf_dir / "README.md").write_text(USERS_README, encoding="utf-8")
    monkeypatch.setattr(releasing, "convert_to_gguf", lambda folder, **options: sorted(gguf_dir.glob("*.gguf")))
    steps = []
    releasing.release(merged, "moe", gguf=True, token=ALICE_WRITE_TOKEN, progress=False,
                      on_step=lambda name, value: steps.append((name, value)))
    assert [v for n, v in steps if n == "card_kept"] == [gguf_dir / "README.md"]  # the model's card is lazymoe's
    assert hub.files("alice/moe-GGUF")["README.md"].data.decode() == USERS_README
    assert "alice/moe-GGUF" in (merged / "README.md").read_text(encoding="utf-8")


def test_the_notebook_says_it_keeps_the_users_readme_without_a_traceback(hub, recipe, merged, tmp_path):
    pytest.importorskip("ipywidgets")
    from lazymoe.notebook.form import MoEForm
    from lazymoe.notebook.ui import Builder

    card = merged / "README.md"
    card.write_text(USERS_README, encoding="utf-8")
    (merged / CARD_RECORD).unlink()
    text = yaml.safe_dump({**yaml.safe_load(recipe.read_text(encoding="utf-8")), "notebook": {"model_name": "moe"}})
    shown = []
    builder = Builder(MoEForm(text), workdir=tmp_path, show=shown.append)
    builder.model_dir = merged
    builder.route()
    builder.form.upload.value, builder.form.token_box.value = True, ALICE_WRITE_TOKEN
    builder.push()
    html = "\n".join(str(getattr(item, "data", "")) for item in shown)
    notice = f"{card} was not written by lazymoe, so it is kept as it is"
    assert html.count(notice) == 2 and "Traceback" not in html and "lazymoe-error" not in html
    assert card.read_text(encoding="utf-8") == USERS_README
    assert hub.files("alice/moe")["README.md"].data.decode() == USERS_README
