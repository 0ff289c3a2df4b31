"""Every code block of README.md runs as written, offline.

A fenced block tagged ``python`` is executed in a fresh namespace, in a temporary working
directory; a ``bash`` block is run by bash there. Untagged blocks are text (the layout tree).
An HTML comment on the line before a block says what it needs:

  <!-- readme-test: skip (REASON) -->         not run; the reason is required, and such blocks stay rare
  <!-- readme-test: needs torchvision; ... --> torchvision's models (skipped without torchvision, with the
                                               stand-in of tests/conftest.py for its compiled ops)
  ... checkpoint.pt ...                        the file exists: a state_dict of torchvision's
                                               deeplabv3_resnet101(num_classes=21), made here
"""
import os
import re
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"(?:<!-- readme-test: (?P<note>.*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```", re.S)


def blocks():
    text = open(README).read()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code"))  # the block's first line, 1-based minus the fence
        out.append(pytest.param(m.group("lang"), m.group("code"), m.group("note") or "",
                                id="README.md:%d-%s" % (line, m.group("lang") or "text")))
    return out


def test_readme_has_runnable_blocks_and_few_skips():
    found = blocks()
    langs = [p.values[0] for p in found]
    assert langs.count("python") >= 2
    skips = [p for p in found if p.values[2].startswith("skip")]
    assert len(skips) <= 2, "README blocks marked skip: %s" % [p.id for p in skips]
    for p in skips:
        assert re.match(r"skip \(.+\)$", p.values[2]), "a skip needs its reason: %s" % p.id


@pytest.mark.parametrize("lang,code,note", blocks())
def test_readme_block_runs(lang, code, note, tmp_path, monkeypatch, request):
    if not lang:
        pytest.skip("untagged block: text, not code")
    if note.startswith("skip"):
        pytest.skip("README says: " + note)
    monkeypatch.chdir(tmp_path)
    if "torchvision" in note:
        seg = request.getfixturevalue("torchvision_models")
        if "checkpoint.pt" in note:
            torch.save(seg.deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21).state_dict(),
                       "checkpoint.pt")
    if lang == "python":
        torch.manual_seed(0)
        exec(compile(code, README, "exec"), {"__name__": "__readme__"})
    elif lang == "bash":
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    else:
        pytest.fail("README block in %r: tag it python or bash, or leave it untagged text" % lang)


def test_design_doc_is_in_the_repository_and_every_pointer_names_it():
    assert os.path.isfile(os.path.join(ROOT, "docs/DESIGN.md"))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    bad = []
    for path in tracked:
        if path == "docs/DESIGN.md" or not path.endswith((".py", ".md", ".sh", ".cpp", ".h", ".cu", ".cuh")):
            continue
        text = open(os.path.join(ROOT, path), errors="replace").read()
        bad += ["%s: %s" % (path, m.group(0)) for m in re.finditer(r"(?<!docs/)\bDESIGN\.md", text)]
    assert not bad, bad
