"""What a new user meets installing: setup.py without torch, info's hints, the Makefile's installs."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_without_torch_says_what_to_run():
    """`pip install .` builds in an isolated env without torch: one line saying what to run instead."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr  # one line, no traceback
    assert "install torch first" in lines[0] and "pip install --no-build-isolation ." in lines[0], lines[0]


def test_info_says_how_to_enable_a_missing_backend(monkeypatch, capsys):
    from aspp_fused import info

    real = info.collect

    def without_triton():
        d = real()
        d["backends"]["triton"] = (False, "triton not importable (ImportError)")
        return d

    monkeypatch.setattr(info, "collect", without_triton)
    assert info.main() == 0
    out = capsys.readouterr().out
    assert "to enable a missing backend:" in out
    assert re.search(r"^  triton +pip install 'aspp_fused\[triton\]'", out, re.M), out


def test_make_test_and_bench_install_their_extras():
    text = open(os.path.join(ROOT, "Makefile")).read()
    recipe = {t: re.search(r"^%s:.*\n((?:\t.*\n)+)" % t, text, re.M).group(1) for t in ("test", "bench", "build-deps")}
    assert '-e ".[test]"' in recipe["test"] and '-e ".[bench]"' in recipe["bench"]
    assert "setuptools>=64" in recipe["build-deps"] and "wheel" in recipe["build-deps"]
    assert re.search(r"^test: build-deps", text, re.M) and re.search(r"^bench: build-deps", text, re.M)
