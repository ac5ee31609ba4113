"""benchmarks/gpu_run.sh, the one call on a lent GPU machine, run here in its CPU dry-run mode
(no nvidia-smi, no CUDA: Triton under the interpreter, the benchmarks' smoke path, small
selections): it finishes, its summary says what happened (a failed CUDA-extension build first),
and the output folder holds at most 8 files at most 2 folders deep, also when a signal cuts the
run short. Also run_all.py's merge-and-report on SIGINT.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
FILES = {"gpu_run.log", "summary.md", "tests.log", "bench.md", "build.log", "results.tgz"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the dry run is for CPU-only machines")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # small: one case in two of the Triton test processes, the band benchmark's headline phase
    env.update(dict(PYTHON=sys.executable, DRY_RUN="1", TEST_SELECT="pool-varlen",
                    TEST_PROCS="triton-fp32 triton-bf16 cuda", BENCH_ONLY="band",
                    BENCH_PHASES="1-headline", WORK=str(tmp_path / "work"),
                    OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"), **extra)
    return env


def _files(out) -> list:
    """Every entry under ``out`` as a relative path; folders end with '/'."""
    found = []
    for dirpath, dirs, files in os.walk(out):
        rel = os.path.relpath(dirpath, out)
        found += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirs]
        found += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return found


def _check_out(out):
    """What comes back from the GPU machine: <= 8 files, <= 2 folders deep, names it accepts."""
    entries = _files(out)
    files = [e for e in entries if not e.endswith("/")]
    assert len(files) <= 8, entries
    assert all(e.rstrip("/").count("/") <= 2 for e in entries), entries
    assert all(set(os.path.basename(e.rstrip("/"))) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") for e in entries)
    return set(files)


def test_dry_run_summary_and_output(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run"], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    took = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert _check_out(out) == FILES
    summary = (out / "summary.md").read_text()
    head = summary.split("| step |")[0]
    assert "DRY RUN on a CPU" in head
    if torch.version.cuda is None:  # no CUDA torch: the explicit build request fails, loudly
        assert "CUDA EXTENSION BUILD FAILED (rc=1" in head and "is a CPU build" in head
        assert "| build | 1 |" in summary
        assert "| tests:cuda | - | 0 | not run: the CUDA extension did not build |" in summary
    for dtype in ("fp32", "bf16"):  # each Triton process ran its one selected case
        assert f"| tests:triton-{dtype} | 0 |" in summary
        row = [line for line in summary.splitlines() if f"tests:triton-{dtype}" in line][0]
        assert "1 passed" in row, row
    assert "| benchmarks | 0 |" in summary and "| projectors | 0 |" in summary
    assert "band / cascade-N24-l1" in summary and "ours[reference]" in summary
    assert "| band | 1-headline | 0 |" in (out / "bench.md").read_text()
    assert "| pargo | 16 | kernels | ok |" in summary
    assert "1 passed" in (out / "tests.log").read_text()
    assert "cannot be built" in (out / "build.log").read_text()
    assert "## band" in (out / "bench.md").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
        [bench] = [n for n in names if n.startswith("./bench/") and n.endswith("-cpu-smoke.json")]
        data = json.load(tar.extractfile(bench))
    assert data["meta"]["smoke"] is True and data["rows"]
    assert {r["case"] for r in data["rows"]} == {"cascade-N24-l1-w11+0"}  # the headline case
    assert {"./env.txt", "./steps.tsv", "./summary.md", "./tests/triton-fp32.xml",
            "./tests/triton-bf16.log", "./proj/projectors-smoke.json", "./build.log"} <= names
    print(f"dry run: {took:.0f} s")


def test_dry_run_cut_short_by_a_signal_still_packs(tmp_path):
    """SIGTERM once the first test passed: the running pytest gets SIGINT and prints its
    counts, the summary says the run was interrupted, the files are packed."""
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", SCRIPT, str(out), "--dry-run"], cwd=ROOT,
                            env=_env(tmp_path, TEST_SELECT="varlen", TEST_PROCS="triton-fp32"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "work" / "tests" / "triton-fp32.log"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().startswith("."):  # a test passed, more to come
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-3000:]
    files = _check_out(out)
    assert {"gpu_run.log", "summary.md", "results.tgz", "tests.log"} <= files, files
    summary = (out / "summary.md").read_text()
    assert "| interrupted | 130 |" in summary and "SIGTERM" in summary
    [row] = [line for line in summary.splitlines() if "tests:triton-fp32" in line]
    assert "passed" in row and "interrupted: SIGINT" in row, row  # pytest's own counts
    assert "SIGTERM at" in (out / "gpu_run.log").read_text()


def test_run_all_merges_and_reports_on_sigint(tmp_path):
    """run_all.py stopped by SIGINT (`timeout -s INT`) after its first rows: it stops the
    running script and writes the merged JSON and markdown of what was measured."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"),
                             "--smoke", "--only", "band", "--phases", "1-headline,2-rest",
                             "--out", str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "raw" / "band.1-headline.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if first.exists() and first.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-3000:]
    assert "interrupted by SIGINT" in stdout and "SUMMARY" in stdout
    [path] = glob.glob(str(tmp_path / "*-cpu-smoke.json"))
    data = json.load(open(path))
    assert data["meta"]["smoke"] is True and len(data["rows"]) >= 2
    assert os.path.exists(path[:-5] + ".md")
