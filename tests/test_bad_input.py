"""The catalogue of bad input: each case gives a clear error or warning, never a silent answer.

Every case asserts the exception (or warning) type and that the message names the problem
and the fix. docs/errors.md lists the same errors for users. Kept under a minute: small n,
and the checks that guard expensive work fire before it.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import reuse_lens as rl
from reuse_lens._io import write_text_atomic
from reuse_lens._validate import OutputPathError
from reuse_lens.circuits import measure
from reuse_lens.cli import main
from reuse_lens.nodes import ModelShape
from reuse_lens.study import StudyConfig, run_study
from reuse_lens.tasks import MetricError, TaskError, TaskWarning
from reuse_lens.tasks.metrics import LogitDiff

CLEAN = "When Mary and John went to the store, John gave a bag to"
CORRUPTED = "When Mary and John went to the store, Paul gave a bag to"


@pytest.fixture(scope="module")
def model() -> Any:
    return rl.load_model("zoo:base")


@pytest.fixture(scope="module")
def task(model: Any) -> rl.Task:
    return rl.tasks.load("ioi", model, n=8, seed=0)


@pytest.fixture(scope="module")
def small_circuit() -> rl.Circuit:
    """A circuit of a 2-layer model: every node also exists in the 4-layer zoo model."""
    return rl.Circuit.from_nodes(["a0.h0", "a1.h2", "m1"], ModelShape(2, 4, True))


def pairs(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        clean=[CLEAN], corrupted=[CORRUPTED], answers=[" Mary"], wrong=[" John"]
    )
    args.update(overrides)
    return args


# ---- text that is not what the user wrote -------------------------------------------------


def test_unknown_word_in_a_prompt_is_refused(model: Any) -> None:
    bad = CORRUPTED.replace("Paul", "Zyzzyx")
    with pytest.raises(TaskError, match=r"corrupted prompt 0 .* does not know: \['Zyzzyx'\]"):
        rl.Task.from_pairs(model, **pairs(corrupted=[bad]))


def test_unknown_word_as_an_answer_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match=r"answer of prompt 0 ' Zyzzyx' .*<unk>"):
        rl.Task.from_pairs(model, **pairs(answers=[" Zyzzyx"]))


def test_empty_prompt_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match="clean prompt 0 is empty"):
        rl.Task.from_pairs(model, **pairs(clean=[""], corrupted=[""]))


def test_whitespace_prompt_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match="is empty"):
        rl.Task.from_pairs(model, **pairs(clean=["  "], corrupted=["  "]))


def test_a_bare_string_of_prompts_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match=r"clean of task 'custom' is one string.*wrap it in a list"):
        rl.Task.from_pairs(model, CLEAN, CORRUPTED, " Mary", " John")


def test_a_bare_string_of_answers_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match=r"answers of task 'custom' is one string"):
        rl.Task.from_pairs(model, **pairs(answers=" Mary"))


def test_a_prompt_of_words_is_refused(model: Any) -> None:
    with pytest.raises(TaskError, match="must be text or a list of token ids"):
        rl.Task.from_pairs(model, **pairs(clean=[CLEAN.split()]))


class _LossyTokenizer:
    """A tokenizer with no unknown token that reads text in lower case."""

    unk_token_id = None
    unk_token = None
    bos_token_id = 0
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 90 for c in text.lower()]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 1) if i - 1 >= 32 else "?" for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(100)}


class _TinyModel:
    cfg = SimpleNamespace(d_vocab=100, default_prepend_bos=True)
    tokenizer = _LossyTokenizer()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("not run")


def test_text_a_tokenizer_without_unk_cannot_reproduce_warns() -> None:
    with pytest.warns(TaskWarning, match="is read by the model as"):
        rl.Task.from_pairs(_TinyModel(), ["Ab"], ["Cd"], [5], [6])  # type: ignore[arg-type]


# ---- wrong types at the boundary ----------------------------------------------------------


def test_spec_string_where_a_model_goes(task: rl.Task) -> None:
    with pytest.raises(
        TypeError, match=r"model must be a loaded model.*rl\.load_model\('zoo:base'\)"
    ):
        rl.faithfulness("zoo:base", task, rl.Circuit.from_nodes(["a0.h0"], ModelShape(4, 4, True)))  # type: ignore[arg-type]


def test_none_where_a_model_goes(task: rl.Task) -> None:
    with pytest.raises(TypeError, match="model must be a loaded model.*got None"):
        rl.evaluate(None, task)  # type: ignore[arg-type]


def test_spec_string_where_a_model_goes_in_tasks_load() -> None:
    with pytest.raises(TypeError, match="load it first"):
        rl.tasks.load("ioi", "zoo:base")  # type: ignore[arg-type]


def test_spec_string_where_a_model_goes_in_from_pairs() -> None:
    with pytest.raises(TypeError, match="model must be a loaded model"):
        rl.Task.from_pairs("zoo:base", **pairs())  # type: ignore[arg-type]


def test_spec_string_where_a_model_goes_in_patching(task: rl.Task) -> None:
    with pytest.raises(TypeError, match="model must be a loaded model"):
        rl.activation_patching("zoo:base", task)  # type: ignore[arg-type]


def test_list_where_a_task_goes(model: Any) -> None:
    with pytest.raises(TypeError, match=r"task must be a reuse_lens Task.*Task\.from_pairs"):
        rl.discover_circuit(model, [CLEAN, CORRUPTED])  # type: ignore[arg-type]


def test_list_where_a_circuit_goes(model: Any, task: rl.Task) -> None:
    with pytest.raises(TypeError, match=r"circuit must be a reuse_lens Circuit.*from_nodes"):
        rl.faithfulness(model, task, ["a0.h0", "m0"])  # type: ignore[arg-type]


def test_path_where_a_circuit_goes(model: Any, task: rl.Task) -> None:
    with pytest.raises(TypeError, match=r"Circuit\.from_json"):
        rl.faithfulness(model, task, "ioi.json")  # type: ignore[arg-type]


def test_list_where_a_mapping_of_circuits_goes(model: Any, task: rl.Task) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(TypeError, match=r"circuits must map names to Circuits"):
        rl.cross_task_faithfulness(model, [circuit], {"ioi": task})  # type: ignore[arg-type]


def test_metric_that_returns_a_scalar(model: Any, task: rl.Task) -> None:
    scalar = task.with_metric(lambda logits, inputs: LogitDiff()(logits, inputs).mean())
    with pytest.raises(MetricError, match=r"shape \(\).*one value per prompt"):
        rl.evaluate(model, scalar)


def test_metric_that_returns_a_float(model: Any, task: rl.Task) -> None:
    number = task.with_metric(lambda logits, inputs: 1.0)
    with pytest.raises(MetricError, match="one value per prompt"):
        rl.activation_patching(model, number)


# ---- counts and seeds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n=64.0), TypeError, r"n must be a whole number, got the float 64\.0: pass 64"),
        (dict(n="64"), TypeError, "n must be a whole number"),
        (dict(n=0), TaskError, "at least one prompt"),
        (dict(n=-3), TaskError, "positive whole number"),
        (dict(n=10**6), TaskError, "at most 100000"),
        (dict(seed=None), TypeError, "seed must be a whole number such as 0, got None"),
        (dict(seed="0"), TypeError, "seed must be a whole number, got the string '0'"),
        (dict(seed=1.5), TypeError, "seed must be a whole number"),
    ],
)
def test_bad_counts_and_seeds_in_tasks_load(model: Any, kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        rl.tasks.load("ioi", model, **kwargs)


def test_select_out_of_range(task: rl.Task) -> None:
    with pytest.raises(TaskError, match=r"index \[8\] out of range .* of 8 prompts"):
        task.select([0, 8])


def test_select_with_names(task: rl.Task) -> None:
    with pytest.raises(TaskError, match="prompt positions"):
        task.select(["a", "b"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n=0), ValueError, "n must be a positive whole number"),
        (dict(n=2.5), TypeError, "n must be a whole number"),
        (dict(seed=None), TypeError, "seed must be a whole number"),
    ],
)
def test_bad_counts_in_random_baseline(model: Any, task: rl.Task, kwargs, error, message) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(error, match=message):
        rl.random_baseline(model, task, circuit, **kwargs)


def test_bad_seed_in_circuit_stability(model: Any, task: rl.Task) -> None:
    with pytest.raises(TypeError, match="seed must be a whole number"):
        rl.circuit_stability(model, task, n_boot=2, seed=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(n_boot=-1), ValueError, "n_boot must be at least 0"),
        (dict(n_boot=1), ValueError, "n_boot must be 0 .* or at least 2"),
        (dict(n_random=0), ValueError, "n_random must be a positive whole number"),
        (dict(n_prompts=0), ValueError, "n_prompts must be a positive"),
        (dict(seed=None), TypeError, "seed must be a whole number"),
        (dict(device=0), TypeError, "device must be a string"),
        (dict(fine_tuned={"nope": "zoo:base"}), ValueError, "unknown tasks"),
    ],
)
def test_bad_study_config(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        StudyConfig(**kwargs)


def test_study_executors_refuse_what_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from reuse_lens.study import MissingExtraError, executor_named

    with pytest.raises(ValueError, match="--address is for --executor ray"):
        executor_named("local", "head:6379")
    with pytest.raises(ValueError, match="unknown executor 'slurm'"):
        run_study(executor="slurm")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r'pip install "reuse_lens\[ray\]"'):
        run_study(executor="ray")


# ---- repeated prompts ---------------------------------------------------------------------


def test_repeated_prompts_warn_with_the_distinct_count(model: Any) -> None:
    with pytest.warns(TaskWarning, match=r"only \d+ distinct prompt pairs among the n=2000"):
        task = rl.tasks.load("sva", model, n=2000, seed=0)
    assert len(task) == 2000


def test_the_default_size_does_not_warn(model: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rl.tasks.load("sva", model, n=64, seed=0)


# ---- circuits that do not fit the model ---------------------------------------------------


def test_circuit_of_a_smaller_model_in_faithfulness(
    model: Any, task: rl.Task, small_circuit: rl.Circuit
) -> None:
    with pytest.raises(rl.CircuitError, match="made for a model of 2 layers .* has 4 layers"):
        rl.faithfulness(model, task, small_circuit)


def test_circuit_of_a_smaller_model_in_random_baseline(
    model: Any, task: rl.Task, small_circuit: rl.Circuit
) -> None:
    with pytest.raises(rl.CircuitError, match="2 layers"):
        rl.random_baseline(model, task, small_circuit, n=2)


def test_circuit_of_a_smaller_model_in_cross_task_ablation(
    model: Any, task: rl.Task, small_circuit: rl.Circuit
) -> None:
    with pytest.raises(rl.CircuitError, match=r"circuit 'small' was made for a model of 2 layers"):
        rl.cross_task_ablation(model, {"small": small_circuit}, {"ioi": task})


# ---- numbers that mean nothing ------------------------------------------------------------


def test_faithfulness_gap_below_the_metric_scale(model: Any, task: rl.Task) -> None:
    """A gap far above 1e-6 but tiny next to the metric's size is noise, not signal."""
    offset = task.with_metric(lambda logits, inputs: LogitDiff()(logits, inputs) * 1e-4 + 100.0)
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(MetricError, match=r"below 0\.001 of the metric's scale"):
        rl.faithfulness(model, offset, circuit)


def test_faithfulness_on_one_prompt_with_mean_ablation(model: Any, task: rl.Task) -> None:
    circuit = rl.Circuit.from_nodes(["a0.h0"], model)
    with pytest.raises(MetricError, match="ablating changes nothing: use more prompts"):
        rl.faithfulness(model, task.select([0]), circuit)


def test_discovery_refuses_a_circuit_below_its_target(
    model: Any, task: rl.Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The full circuit always reaches the target unless the metric is broken; simulate that.
    from reuse_lens.circuits.interval import FaithfulnessInterval

    half = FaithfulnessInterval(0.5, 0.45, 0.55, 0.95, 1000, 0)
    monkeypatch.setattr(
        measure.CircuitEvaluator, "node_intervals", lambda self, sets, r: [half] * len(sets)
    )
    monkeypatch.setattr(measure.CircuitEvaluator, "interval", lambda self, c, *a, **k: half)
    with pytest.raises(
        MetricError, match=r"reaches the faithfulness target 0\.9.*give 0\.500 \[0\.450, 0\.550\]"
    ):
        rl.discover_circuit(model, task, method="eap")


# ---- model specs --------------------------------------------------------------------------


def test_missing_folder_is_not_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(rl.ModelLoadError, match="there is no model folder .*zoo:<name>"):
        rl.load_model(str(tmp_path / "no" / "such" / "folder"))


def test_folder_without_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(rl.ModelLoadError, match=r"has no tokenizer.*save_pretrained"):
        rl.load_model(tmp_path)


def test_a_file_where_a_model_folder_goes(tmp_path: Path) -> None:
    file = tmp_path / "model.bin"
    file.write_text("")
    with pytest.raises(rl.ModelLoadError, match="is a file, not a model folder"):
        rl.load_model(str(file))


# ---- writes -------------------------------------------------------------------------------


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / f".x.json.{_dead_pid()}.deadbeef.tmp"
    live = tmp_path / f".x.json.{os.getppid()}.cafebabe.tmp"
    stale.write_text("half")
    live.write_text("in progress")
    write_text_atomic(tmp_path / "x.json", "{}")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "x.json").read_text() == "{}"


def test_overlap_report_writes_atomically(
    model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = rl.Circuit.from_nodes(["a0.h0"], model)
    b = rl.Circuit.from_nodes(["a0.h1"], model)
    target = tmp_path / "overlap.json"
    target.write_text("old")

    def fail(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match=r"cannot write '.*overlap\.json': No space left") as info:
        rl.compare({"a": a, "b": b}).to_json(target)
    assert ".tmp" not in str(info.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.fixture
def held_lock(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/out`` locked as another run would lock it (another open file)."""
    folder = tmp_path / "out"
    folder.mkdir()
    fd = os.open(folder / ".reuse-lens.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"12345")
    yield folder
    os.close(fd)


def test_two_studies_into_one_folder(held_lock: Path) -> None:
    with pytest.raises(OutputPathError, match=r"another reuse-lens run \(process 12345\)"):
        run_study(StudyConfig(tasks=("ioi",), fine_tuned={}), out=held_lock, progress=False)


def test_study_out_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputPathError, match="is a file, but a folder goes there"):
        run_study(StudyConfig(tasks=("ioi",), fine_tuned={}), out=tmp_path / "f")


# ---- the command line ---------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit status and stderr of ``reuse-lens argv``."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    return code, capsys.readouterr().err


DISCOVER = ["discover", "--model", "zoo:base", "--task", "ioi"]


def one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and ".tmp" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert any(message in x for x in lines), err
    assert lines[-1].startswith("reuse-lens"), err


def test_cli_out_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([*DISCOVER, "--out", str(tmp_path)], capsys)
    one_line_error(code, err, "is a folder, but a file goes there")


def test_cli_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    code, err = run_cli([*DISCOVER, "--out", str(tmp_path / "f" / "c.json")], capsys)
    one_line_error(code, err, "which is a file, not a folder")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs an unwritable /proc")
def test_cli_out_unwritable(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([*DISCOVER, "--out", "/proc/c.json"], capsys)
    one_line_error(code, err, "cannot be written")


def test_cli_figure_path_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.html").mkdir()
    code, err = run_cli([*DISCOVER, "--out", str(tmp_path / "c.json")], capsys)
    one_line_error(code, err, "is a folder")


def test_cli_compare_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    code, err = run_cli(["compare", "a.json", "b.json", "--out", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "is a file, but a folder goes there")


def test_cli_demo_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("")
    code, err = run_cli(["demo", "--out", str(tmp_path / "f")], capsys)
    one_line_error(code, err, "is a file, but a folder goes there")


def test_cli_demo_into_a_locked_folder(held_lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["demo", "--tasks", "ioi", "--out", str(held_lock)], capsys)
    one_line_error(code, err, "another reuse-lens run")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--n-boot", "-1"], "--n-boot: must be 0 or a positive integer, got -1"),
        (["demo", "--n-boot", "1"], "n_boot must be 0 (no stability section) or at least 2"),
        (["demo", "--n-random", "0"], "--n-random: must be a positive integer"),
        ([*DISCOVER, "--n", "1.5", "--out", "c.json"], "--n: must be a whole number, got '1.5'"),
        ([*DISCOVER, "--seed", "x", "--out", "c.json"], "--seed: must be a whole number"),
        ([*DISCOVER, "--target", "high", "--out", "c.json"], "--target: must be a number"),
    ],
)
def test_cli_bad_numbers(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "demo":
        argv = [*argv, "--out", str(tmp_path / "demo")]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err, err


def test_cli_missing_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "models" / "mine")
    code, err = run_cli(["evaluate", "--model", missing, "--task", "ioi"], capsys)
    one_line_error(code, err, "there is no model folder")
    assert "Repo id" not in err


def test_cli_model_folder_without_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text("{}")
    code, err = run_cli(["evaluate", "--model", str(tmp_path), "--task", "ioi"], capsys)
    one_line_error(code, err, "has no tokenizer")


def test_cli_circuit_of_a_smaller_model(
    small_circuit: rl.Circuit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "small.json"
    small_circuit.to_json(path)
    argv = ["evaluate", "--model", "zoo:base", "--task", "ioi", "--n", "8", "--circuit", str(path)]
    code, err = run_cli(argv, capsys)
    one_line_error(code, err, "made for a model of 2 layers")


def test_cli_discover_on_one_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    code, err = run_cli([*DISCOVER, "--n", "1", "--out", str(out)], capsys)
    one_line_error(code, err, "use more prompts")
    assert not out.exists()


def test_cli_repeated_prompts_warn_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["evaluate", "--model", "zoo:base", "--task", "sva", "--n", "2000"], capsys)
    assert code == 0
    assert "reuse-lens: warning: task 'sva' has only" in err and "distinct" in err


def test_cli_error_in_a_subprocess_is_one_line(tmp_path: Path) -> None:
    """The installed command's own exit path: status 2 and one line, no traceback."""
    (tmp_path / "f").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "reuse_lens.cli", *DISCOVER, "--out", str(tmp_path / "f" / "c")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "which is a file" in result.stderr
