"""The exercise framework: answers are never leaked on a miss, solutions are gated on an attempt and pass."""

import math

import pytest
import torch

from labs_lib import exercises
from labs_lib.errors import LabsError
from labs_lib.exercises import EXERCISES, check, judge, show_solution


@pytest.fixture(autouse=True)
def fresh_attempts(monkeypatch):
    monkeypatch.setattr(exercises, "_attempted", set())


def _answer(name: str):
    """The worked solution as the learner would hand it in: the function itself, or the number it computes."""
    ex = EXERCISES[name]
    return ex.solution if ex.kind == "function" else ex.solution()


@pytest.mark.parametrize("name", list(EXERCISES))
def test_each_solution_passes_its_own_checker(name):
    ok, detail = judge(name, _answer(name))
    assert ok, detail


@pytest.mark.parametrize("name", list(EXERCISES))
def test_question_has_all_its_numbers(name):
    assert "{" not in EXERCISES[name].text()  # a missing parameter raises KeyError


def _wrong(name: str):
    """A plausible wrong answer of the right type."""
    ex = EXERCISES[name]
    if ex.kind == "function":
        right = ex.solution
        return lambda *args: (lambda r: r + 1 if not isinstance(r, torch.Tensor) else r * 1.01 + 1e-3)(right(*args))
    value = ex.solution()
    return tuple(-v - 1 for v in value) if isinstance(value, tuple) else value * 1.5 + 1


@pytest.mark.parametrize("name", list(EXERCISES))
def test_first_miss_does_not_print_the_expected_answer(name, capsys):
    ex = EXERCISES[name]
    check(name, _wrong(name))
    out = capsys.readouterr().out
    assert "not yet" in out
    if ex.kind == "number":
        want = ex.solution()
        for v in (want if isinstance(want, tuple) else (want,)):
            for text in {f"{v:g}", f"{v:.4g}", f"{v:.3g}", repr(v)} - {"0", "1"}:
                assert text not in out, f"the miss message shows the answer {text}: {out}"


def test_function_miss_names_the_kind_of_input_not_the_value(capsys):
    def no_subnormals(x):  # flushes values below the smallest normal to zero: wrong only for subnormals
        out = EXERCISES["round_to_e4m3"].solution(x)
        return torch.where(x.abs() < 2.0**-6, 0.0, out)

    ok, detail = judge("round_to_e4m3", no_subnormals)
    assert not ok and "subnormal" in detail and "0.0078" not in detail and "2^-" not in detail.split("subnormal")[0]


def test_number_miss_says_too_high_or_too_low():
    want = EXERCISES["int4_g32_asym_bits"].solution()
    assert "too high" in judge("int4_g32_asym_bits", want * 1.1)[1]
    assert "too low" in judge("int4_g32_asym_bits", want * 0.9)[1]


def test_solution_is_shown_only_after_an_attempt(capsys):
    show_solution("pack_e2m1_pair")
    out = capsys.readouterr().out
    assert "try it first" in out and "def " not in out
    check("pack_e2m1_pair", None)  # not an attempt
    show_solution("pack_e2m1_pair")
    assert "try it first" in capsys.readouterr().out
    check("pack_e2m1_pair", lambda a, b: 0)
    show_solution("pack_e2m1_pair")
    out = capsys.readouterr().out
    assert "def _pack_e2m1_solution" in out and "try it first" not in out


def test_number_solution_prints_its_value_after_an_attempt(capsys):
    check("nvfp4_bits_block32", 4.0)
    show_solution("nvfp4_bits_block32")
    assert "4.25" in capsys.readouterr().out


def test_gptq_step_checker_rejects_a_step_without_feedback():
    def round_only(W, U, i, q):
        W[:, i] = q
        return W

    ok, detail = judge("gptq_column_step", round_only)
    assert not ok and "later columns" in detail


def test_gptq_step_solution_equals_labs_lib_gptq_on_a_whole_weight():
    W, H = exercises._gptq_problem(8, 16, seed=5)
    ours = exercises._run_gptq_steps(exercises.gptq_step_solution, W.clone(), H)
    assert torch.allclose(ours, exercises._gptq_loop_reference(W, H), atol=1e-4)
    def no_feedback_step(W, U, i, q):
        return W.index_copy(1, torch.tensor([i]), q[:, None])

    no_feedback = exercises._run_gptq_steps(no_feedback_step, W.clone(), H)
    assert not torch.allclose(no_feedback, exercises._gptq_loop_reference(W, H), atol=1e-4)


def test_learner_exceptions_are_feedback_and_unknown_names_are_errors():
    assert not judge("round_to_e4m3", lambda x: 1 / 0)[0]
    assert "not attempted" in judge("round_to_e4m3", lambda x: None)[1]
    assert "not attempted" in judge("llama8b_nvfp4_gb", None)[1]
    with pytest.raises(LabsError, match="No exercise"):
        check("no_such_exercise", 1)


def test_known_answers():
    assert judge("decode_byte_0x2b", (-1.5, 1.0))[0] and not judge("decode_byte_0x2b", (1.0, -1.5))[0]
    assert judge("awq_alpha_that_is_rtn", 0)[0] and not judge("awq_alpha_that_is_rtn", 0.5)[0]
    assert not judge("pack_e2m1_pair", lambda a, b: EXERCISES["pack_e2m1_pair"].solution(b, a))[0]  # nibbles swapped
    assert math.isclose(EXERCISES["llama8b_nvfp4_gb"].reference(), 6.0, rel_tol=0.02)  # 2.7x below BF16, not 3.56x
    assert judge("nvfp4_bits_block32", 4.25)[0] and not judge("nvfp4_bits_block32", 4.5)[0]
    assert judge("e5m2_min_subnormal", 2.0**-16)[0] and not judge("e5m2_min_subnormal", 2.0**-14)[0]
    assert judge("q4_0_bits", 4.5)[0] and not judge("q4_0_bits", 4.0)[0]
    assert judge("q8_0_bytes_4096", 17_825_792)[0] and not judge("q8_0_bytes_4096", 4096 * 4096)[0]
    assert judge("mc_items_for_stderr", 1875)[0] and not judge("mc_items_for_stderr", 100)[0]
    assert judge("bits_per_byte", 0.848)[0] and not judge("bits_per_byte", 0.588)[0]
    assert judge("decode_tok_s_example", 50)[0] and not judge("decode_tok_s_example", 64 / 1.38)[0]
    assert judge("llama70b_nvfp4_spark_ceiling", 6.72)[0] and not judge("llama70b_nvfp4_spark_ceiling", 273 / 70.6)[0]
    assert judge("delayed_scale_step4", 448 / 12)[0] and not judge("delayed_scale_step4", 448 / 6)[0]
    assert judge("mix_counts_example", (4, 2, 1))[0] and not judge("mix_counts_example", (3, 2, 2))[0]
    assert math.isclose(EXERCISES["qwen3_14b_bf16_gb"].reference(), 29.5, rel_tol=0.01)  # 14.8 B parameters


def test_mix_counts_solution_is_labs_lib_mix_counts_on_other_inputs():
    from labs_lib.calibration import mix_counts

    for weights, total in [((1, 1, 1), 10), ((0.3, 0.3, 0.2, 0.2), 64), ((5, 1), 3), ((0.1, 0.9), 200)]:
        assert list(exercises._mix_counts_solution(weights, total)) == mix_counts(list(weights), total)


def test_calibration_peak_checker_rejects_a_peak_without_the_activations():
    def weights_only(shape, batch, seq_len):
        return shape.params * 2 + max(o * i for o, i in shape.linear_shapes()) * 2

    ok, detail = judge("calibration_peak_bytes", weights_only)
    assert not ok and "Llama-3.1-8B" in detail
